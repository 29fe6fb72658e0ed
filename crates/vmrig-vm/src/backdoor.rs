//! The guest command channel: the NixOS backdoor protocol over the virtio console.
//!
//! The guest runs a root bash reading commands from `/dev/hvc0` (a raw tty: bytes pass
//! unchanged) and announces itself with [`BANNER`]. NixOS sends two lines per command
//! (`bash -c '<cmd>' | (base64 -w 0; echo)` then `echo ${PIPESTATUS[0]}`): two round trips
//! and three guest processes. We send one line whose reply carries output and exit status
//! together, and start no program at all in the guest: the command runs in a command
//! substitution, which is a fork of the already running bash (no exec), and the reply is
//! written by bash builtins, length-prefixed:
//!
//! ```text
//! __o=$( trap 'printf "\37"' EXIT; eval '<cmd>' </dev/null ); __s=$?; ... printf 'T %d %d\n%s\n' ...
//! -> "T <status> <length>\n<length bytes of stdout>\n"
//! ```
//!
//! Command substitution drops trailing newlines; the EXIT trap appends a marker byte (0x1f)
//! after everything the command wrote, even when it calls `exit`, and the marker is cut off
//! again, so the output arrives byte for byte. The length is counted with `LC_ALL=C` (bytes,
//! not characters) and the shell's locale restored. What this framing cannot carry: NUL bytes
//! (bash drops them from a command substitution) and, if the command replaces the EXIT trap
//! or `exec`s, its trailing newlines. [`Framing::Exact`] pipes through `base64` instead (one
//! program start per command, NUL-safe) for callers that need arbitrary bytes:
//!
//! ```text
//! printf 'B '; ( eval '<cmd>' ) </dev/null | base64 -w 0; echo " ${PIPESTATUS[0]}"
//! -> "B <base64 of stdout> <status>\n"
//! ```
//!
//! The guest needs only bash (and coreutils' base64 for exact output), so real NixOS guests
//! work too. Stdin is `/dev/null` so a command that reads stdin cannot swallow the driver's
//! next commands. Every read is bounded by a deadline and the reply size.
//!
//! **A time limit in the guest.** A command given a time limit ([`frame_limited`]) runs
//! piped into a watchdog, the pipeline in its own process group (`set -m`). The pipe
//! carries no data: the watchdog's `read -t` ends at end-of-file when the command's shell
//! exits, or at the limit, when it kills the group (TERM, KILL once the command's shell is
//! gone or two seconds later). The reply then carries status 124, as from coreutils'
//! `timeout`, which is what NixOS wraps every command in; the shell is free at once. No
//! program is started for this (bash forks only). The shell's own job messages go to
//! `/dev/null`, the command's stderr where it always goes.
//!
//! **No controlling terminal.** The guest's shell is started by its init as a session leader
//! and opens `/dev/hvc0`, which makes the command channel the controlling terminal of every
//! command: a command that opens `/dev/tty` (an `ssh` asking for a password) would write
//! into the replies and read the driver's next commands. [`RELEASE_TERMINAL`], sent once to
//! each new shell, replaces it by a shell in a session of its own (`setsid -w`): the old
//! session keeps the console as its terminal, so the new one cannot acquire it, and
//! `/dev/tty` fails with ENXIO ("No such device or address") in every command.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::Engine;

/// The line the guest prints when its shell is ready.
pub const BANNER: &str = "Spawning backdoor root shell...";

/// The largest command output accepted (decoded); a larger reply is an error, not an OOM.
#[cfg(not(fuzzing))]
pub const MAX_OUTPUT: usize = 256 * 1024 * 1024;
/// In fuzz builds (cargo-fuzz's `--cfg fuzzing`) 64 KiB, so that the fuzzer reaches the bound
/// of a reply being received without feeding 341 MiB per input.
#[cfg(fuzzing)]
pub const MAX_OUTPUT: usize = 64 * 1024;

/// A byte stream whose reads can be bounded in time.
pub trait TimedStream: Read + Write {
    fn set_read_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds writes (a command's input may be more than the guest takes at once).
    fn set_write_deadline(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl TimedStream for UnixStream {
    fn set_read_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero timeout means "block forever" to the OS: never pass it.
        self.set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
    }
    fn set_write_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
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

/// How a command's output travels back (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Bash builtins only, no program started in the guest; NUL bytes are dropped.
    #[default]
    Text,
    /// Through `base64`: every byte exact, one more guest process.
    Exact,
}

/// Sent once to a new shell, before its first command: if the shell has a controlling
/// terminal (the console it reads), it replaces itself by a shell reading the same console
/// in a new session without one (see the module documentation). A shell that has none
/// already, or a guest without `setsid`, keeps its shell. util-linux's `setsid` is taken by
/// its path first: a test that puts busybox's applets first on `PATH` (upstream's busybox
/// test does) would otherwise get busybox's, which has no `-w`, and lose the shell. The
/// second line, run by the shell that stays, opens [`SLEEP_FD`]. The lines have no reply.
pub const RELEASE_TERMINAL: &str =
    "__ss=; for __p in /usr/bin/setsid /bin/setsid /run/current-system/sw/bin/setsid; \
     do if [[ -x $__p ]]; then __ss=$__p; break; fi; done; \
     if [[ -z $__ss ]] && command -v setsid >/dev/null; then __ss=setsid; fi; \
     if [[ -n $__ss ]] && { : </dev/tty; } 2>/dev/null; \
     then exec \"$__ss\" -w \"$BASH\" --norc /dev/hvc0; fi; unset __ss __p\n\
     exec 7<> <(:)\n";

/// A descriptor of the guest's shell that nothing is ever written to (both ends of a pipe):
/// the wait for a command's background jobs sleeps on it with `read -t` (a builtin), which
/// saves a fork per pause over `read -t <> <(:)`. Commands do not inherit it.
pub const SLEEP_FD: u32 = 7;

/// The line sent to the guest for `command`.
pub fn frame(command: &str, framing: Framing) -> Result<String, ShellError> {
    frame_limited(command, framing, None)
}

/// The watchdog's kill sequence after the limit: TERM to the command's process group, KILL
/// once the command's shell has exited, or after this many seconds.
const KILL_AFTER_SECS: u32 = 2;

/// The status a command killed at its time limit reports (coreutils' `timeout`).
pub const TIMED_OUT_STATUS: i32 = 124;

/// [`frame`] with a time limit enforced in the guest (see the module documentation): the
/// command is killed after `limit` and its reply has status [`TIMED_OUT_STATUS`] and the
/// output written until then. `None` or a zero limit: no limit (as `timeout 0`). The
/// exact framing takes no limit (the caller's deadline bounds it).
pub fn frame_limited(
    command: &str,
    framing: Framing,
    limit: Option<Duration>,
) -> Result<String, ShellError> {
    let quoted = quote_command(command)?;
    let limit = limit.filter(|l| !l.is_zero());
    Ok(match framing {
        Framing::Text => match limit {
            None => text_frame(&format!("eval {quoted} </dev/null {SLEEP_FD}<&-")),
            Some(limit) => text_frame(&limited(&quoted, limit)),
        },
        Framing::Exact => format!(
            "printf 'B '; ( eval {quoted} ) </dev/null {SLEEP_FD}<&- | base64 -w 0; echo \" ${{PIPESTATUS[0]}}\"\n"
        ),
    })
}

/// The line for `command` reading its stdin from the `len` bytes the driver sends right
/// after the line. The shell reads its commands one byte at a time (its input is not
/// seekable), so those bytes are still in the console's queue for `head` to read in bulk:
/// input this way costs no shell parsing (a command line holding the data is read by bash
/// at one byte per system call, ~60 KB/s under TCG).
pub fn frame_with_input(command: &str, len: usize) -> Result<String, ShellError> {
    let quoted = quote_command(command)?;
    Ok(text_frame(&format!(
        "head -c {len} | ( {} eval {quoted} ) {SLEEP_FD}<&-",
        exit_trap_waiting_for_jobs("")
    )))
}

/// The command (already quoted) piped into a watchdog that kills it after `limit`.
///
/// The pipe between them carries no data: the command's group holds its write end (as fd
/// 3, closed for the command itself), so the watchdog's `read -t` ends with end-of-file the
/// moment the command's shell exits, or with a timeout (status > 128) when the limit
/// strikes. Nobody has to stop the watchdog. (It used to be a separate job killed with
/// TERM: bash, catching TERM, could take the signal just before its `read -t` began, and
/// then slept its whole limit: a poll's attempt hung until the global timeout. That hung
/// upstream's files, tty and nfs tests in CI.)
///
/// At the limit the watchdog ignores TERM itself, sends it to the pipeline's process group
/// (its own: `set -m` gives the pipeline one, and the watchdog checks it is not the
/// shell's), waits until the command's shell is gone or [`KILL_AFTER_SECS`] have passed,
/// then sends KILL, which ends the watchdog too: its status 137 says the limit struck, and
/// the reply says 124. The command's stdout is the reply's pipe (fd 9), its stderr the
/// shell's (fd 8); the substitution's own stderr goes to `/dev/null` (bash's job messages).
/// The substitution drops its EXIT trap and writes the marker itself at its end (a child
/// could run an inherited EXIT trap, and the marker would come twice). The command is a
/// subshell in a group: `exec` in the command replaces the subshell, while the group keeps
/// holding the pipe until the exec'd program ends, so the limit still holds.
fn limited(quoted: &str, limit: Duration) -> String {
    // Whole milliseconds, never 0 (`read -t 0` does not wait at all).
    let secs = format!("{:.3}", limit.as_secs_f64().max(0.001));
    format!(
        "trap - EXIT; exec 8>&2 2>/dev/null 9>&1; set -m; \
         {{ ( {} eval {quoted} 3>&- ); }} \
         </dev/null 3>&1 >&9 2>&8 8>&- 9>&- {SLEEP_FD}<&- \
         | {{ read -t {secs}; if (( $? > 128 )); then \
         read -r -a __st < /proc/$BASHPID/stat; \
         if (( __st[4] != $$ )); then trap '' TERM; kill -TERM -- -${{__st[4]}}; \
         read -t {KILL_AFTER_SECS}; kill -KILL -- -${{__st[4]}}; fi; fi; }} \
         >/dev/null 8>&- 9>&- {SLEEP_FD}<&-; \
         __p=(\"${{PIPESTATUS[@]}}\"); __r=${{__p[0]}}; \
         if [[ ${{__p[1]}} == 137 ]]; then __r={TIMED_OUT_STATUS}; fi; \
         printf '\\37'; exit $__r",
        exit_trap_waiting_for_jobs(""),
    )
}

/// `command` quoted for bash; a NUL cannot be sent on a line.
fn quote_command(command: &str) -> Result<String, ShellError> {
    if command.contains('\0') {
        return Err(ShellError::NulInCommand);
    }
    Ok(shell_quote(command))
}

/// An EXIT trap for the subshell a command runs in: wait while background jobs the
/// command started still hold its stdout, as upstream's reply waits for stdout to close
/// (`(echo ONE; sleep 15; echo TWO) &` returns both lines, with their newlines). A job
/// whose stdout goes elsewhere (`cmd >&2 &`, the way tests start servers) is not waited
/// for; it is polled, not `wait`ed, because a job just forked has not yet applied its own
/// redirections. `__b` is `$!` from before the command: when it is unchanged the command
/// started no job and nothing is forked. No single quote: it goes inside a `trap '...'`.
/// Every step succeeds, so a `set -e` shell keeps the command's status. `then` (no single
/// quote either) runs after the wait. Ends with `;`, ready for the command.
fn exit_trap_waiting_for_jobs(then: &str) -> String {
    format!(
        "__b=${{!-}}; trap 'if [[ ${{!-}} != \"$__b\" ]]; then for __j in $(jobs -p); do \
         while [[ /proc/$__j/fd/1 -ef /proc/$BASHPID/fd/1 ]]; do \
         read -t 0.02 -u {SLEEP_FD} || (( $? > 128 )) || read -t 0.02 <> <(:) || :; \
         done; done; fi{then}' EXIT;"
    )
}

/// [`Framing::Text`] around `inner` (the command as the guest runs it).
fn text_frame(inner: &str) -> String {
    format!(
        "__o=$( {} {inner} ); __s=$?; \
             case $__o in *$'\\37') __o=${{__o%$'\\37'}};; \
             *$'\\37'*) __o=${{__o%$'\\37'*}}${{__o##*$'\\37'}};; esac; __l=${{LC_ALL-$'\\37'}}; LC_ALL=C; \
             printf 'T %d %d\\n%s\\n' $__s ${{#__o}} \"$__o\"; \
             if [[ $__l == $'\\37' ]]; then unset LC_ALL; else LC_ALL=$__l; fi; \
             unset __o __s __l\n",
        exit_trap_waiting_for_jobs("; printf \"\\37\"")
    )
}

/// Single-quotes `s` for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The longest `T <status> <length>` header line accepted.
const MAX_HEADER: usize = 64;

/// Parses the reply at the start of `buf`: `Ok(None)` while it is incomplete, else the
/// output and how many bytes of `buf` it used. `scanned` is how far `buf` is known to hold
/// no newline (a hint from earlier calls on the same growing buffer, 0 when unknown), so
/// that a long base64 line is not searched again from its start on every read.
pub fn parse_reply(
    buf: &[u8],
    scanned: usize,
) -> Result<Option<(CommandOutput, usize)>, ShellError> {
    let garbled = |bytes: &[u8]| ShellError::Protocol(excerpt(bytes));
    let newline = |from: usize| {
        buf.get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
            .map(|p| from + p)
    };
    match buf {
        [] | [b'T' | b'B'] => Ok(None),
        [b'T', b' ', ..] => {
            // The header is short: search it from the start (a `scanned` hint may point
            // into the body already).
            let head_area = &buf[..buf.len().min(MAX_HEADER + 1)];
            let Some(end) = head_area.iter().position(|&b| b == b'\n') else {
                return if buf.len() > MAX_HEADER {
                    Err(garbled(buf))
                } else {
                    Ok(None)
                };
            };
            let head = &buf[..end];
            let (status, len) = parse_text_head(head).ok_or_else(|| garbled(head))?;
            if len > MAX_OUTPUT {
                return Err(ShellError::TooLarge);
            }
            let body = end + 1;
            if buf.len() < body + len + 1 {
                return Ok(None);
            }
            if buf[body + len] != b'\n' {
                return Err(garbled(&buf[..(body + len + 1).min(buf.len())]));
            }
            let stdout = buf[body..body + len].to_vec();
            Ok(Some((CommandOutput { status, stdout }, body + len + 1)))
        }
        [b'B', b' ', ..] => {
            let Some(end) = newline(scanned) else {
                return Ok(None);
            };
            let out = parse_exact_line(&buf[2..end]).ok_or_else(|| garbled(&buf[..end]))?;
            Ok(Some((out, end + 1)))
        }
        _ => Err(garbled(&buf[..newline(0).unwrap_or(buf.len())])),
    }
}

/// `T <status> <length>` -> (status, length).
fn parse_text_head(head: &[u8]) -> Option<(i32, usize)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut fields = head.strip_prefix("T ")?.split(' ');
    let status = fields.next()?.parse().ok()?;
    let len = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((status, len))
}

/// `<base64> <status>` -> the output.
fn parse_exact_line(line: &[u8]) -> Option<CommandOutput> {
    let space = line.iter().rposition(|&b| b == b' ')?;
    let status = std::str::from_utf8(&line[space + 1..])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(&line[..space])
        .ok()?;
    Some(CommandOutput { status, stdout })
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
    /// Bytes read past the last complete reply or line.
    pending: Vec<u8>,
    busy: Option<String>,
    /// A command sent without waiting for its reply ([`Shell::send_detached`]): the next
    /// exchange reads (and drops) that reply first.
    unread: Option<String>,
    /// The read buffer, allocated once (not a fresh 64 KiB per read of a dribbling guest).
    chunk: Vec<u8>,
}

impl<S: TimedStream> Shell<S> {
    pub fn new(stream: S) -> Self {
        Shell {
            stream,
            pending: Vec::new(),
            busy: None,
            unread: None,
            chunk: vec![0; 64 * 1024],
        }
    }

    /// Reads until the banner line; anything before it is discarded. Lines are looked at
    /// in place and dropped once per read (not once per line: a guest printing many short
    /// lines would otherwise cost quadratic time). A line over 64 KiB is an error.
    pub fn wait_for_banner(&mut self, deadline: Instant) -> Result<(), ShellError> {
        const LIMIT: usize = 64 * 1024;
        let start = Instant::now();
        let mut scanned = 0;
        loop {
            let mut line_start = 0;
            while let Some(pos) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let line = self.pending[line_start..end].trim_ascii_end();
                line_start = end + 1;
                scanned = line_start;
                if line.ends_with(BANNER.as_bytes()) {
                    self.pending.drain(..line_start);
                    // A new shell: nothing from the old one is still to come.
                    self.busy = None;
                    self.unread = None;
                    return Ok(());
                }
            }
            self.pending.drain(..line_start);
            scanned = self.pending.len();
            if self.pending.len() > LIMIT {
                return Err(ShellError::TooLarge);
            }
            self.fill(start, deadline)?;
        }
    }

    /// Runs `command`; waits for its reply until `deadline` (None: no bound — callers pass one).
    pub fn run(
        &mut self,
        command: &str,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        self.run_framed(command, Framing::Text, deadline)
    }

    /// [`Shell::run`] with a time limit enforced in the guest ([`frame_limited`]): a command
    /// still running after `limit` is killed there and replies with status
    /// [`TIMED_OUT_STATUS`]. `deadline` bounds the wait for the reply as in [`Shell::run`]
    /// (give it some seconds more than `limit`).
    pub fn run_limited(
        &mut self,
        command: &str,
        limit: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        let line = frame_limited(command, Framing::Text, limit)?;
        self.exchange(command, &line, &[], deadline)
    }

    /// Sends `command` (framed, with its time limit) and returns at once; the next exchange
    /// reads its reply first and drops it (NixOS's `execute(check_output=False)`, for
    /// commands that take the shell down). A shell that is gone by then (a new shell's
    /// banner) owes no reply.
    pub fn send_detached(
        &mut self,
        command: &str,
        limit: Option<Duration>,
        deadline: Instant,
    ) -> Result<(), ShellError> {
        self.settle(Some(deadline))?;
        let line = frame_limited(command, Framing::Text, limit)?;
        self.write_line(command, &line, &[], deadline)?;
        self.unread = Some(command.chars().take(80).collect());
        Ok(())
    }

    /// Sends [`RELEASE_TERMINAL`] and waits until the (possibly new) shell answers.
    pub fn release_terminal(&mut self, deadline: Instant) -> Result<(), ShellError> {
        self.settle(Some(deadline))?;
        self.write_line("(release the terminal)", RELEASE_TERMINAL, &[], deadline)?;
        self.run("true", Some(deadline)).map(|_| ())
    }

    /// [`Shell::run`] with a chosen [`Framing`].
    pub fn run_framed(
        &mut self,
        command: &str,
        framing: Framing,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        let line = frame(command, framing)?;
        self.exchange(command, &line, &[], deadline)
    }

    /// Runs `command` with `input` as its stdin ([`frame_with_input`]).
    pub fn run_with_input(
        &mut self,
        command: &str,
        input: &[u8],
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        let line = frame_with_input(command, input.len())?;
        self.exchange(command, &line, input, deadline)
    }

    /// Sends `line` (and `input` after it) and reads the reply.
    fn exchange(
        &mut self,
        command: &str,
        line: &str,
        input: &[u8],
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        self.settle(deadline)?;
        let deadline =
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        self.write_line(command, line, input, deadline)?;
        self.read_reply(deadline).inspect_err(|e| {
            if matches!(e, ShellError::Timeout(_)) {
                self.busy = Some(command.chars().take(80).collect());
            }
        })
    }

    /// Reads what earlier commands still owe: the reply of a detached command (waiting for
    /// it until `deadline`), and that of a command that outlived its deadline (if it came
    /// since; otherwise the shell is still busy with it).
    fn settle(&mut self, deadline: Option<Instant>) -> Result<(), ShellError> {
        if let Some(earlier) = self.unread.clone() {
            let wait =
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
            match self.read_reply(wait) {
                Ok(_) => self.unread = None,
                Err(ShellError::Timeout(_)) => return Err(ShellError::Busy(earlier)),
                Err(e) => return Err(e),
            }
        }
        if let Some(earlier) = self.busy.clone() {
            // The reply of a command that outlived its deadline may have arrived since:
            // then the shell is free again. Otherwise it is still running.
            let wait = deadline
                .unwrap_or_else(Instant::now)
                .min(Instant::now() + Duration::from_millis(50));
            match self.read_reply(wait) {
                Ok(_) => self.busy = None,
                Err(ShellError::Timeout(_)) => return Err(ShellError::Busy(earlier)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `line` and `input`, bounded by `deadline`.
    fn write_line(
        &mut self,
        command: &str,
        line: &str,
        input: &[u8],
        deadline: Instant,
    ) -> Result<(), ShellError> {
        let started = Instant::now();
        self.stream
            .set_write_deadline(Some(deadline.saturating_duration_since(started)))?;
        let written = self
            .stream
            .write_all(line.as_bytes())
            .and_then(|()| self.stream.write_all(input))
            .and_then(|()| self.stream.flush());
        self.stream.set_write_deadline(None)?;
        if let Err(e) = written {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                // The guest stopped taking the input: the command waits for the rest.
                self.busy = Some(command.chars().take(80).collect());
                return Err(ShellError::Timeout(started.elapsed()));
            }
            return Err(closed_or_io(e));
        }
        Ok(())
    }

    /// Writes raw bytes to the guest shell (NixOS's `send_console`-like escapes go
    /// elsewhere; this is for the interactive shell).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads one whole reply (see [`parse_reply`]).
    fn read_reply(&mut self, deadline: Instant) -> Result<CommandOutput, ShellError> {
        let start = Instant::now();
        let mut scanned = 0;
        loop {
            if let Some((out, used)) = parse_reply(&self.pending, scanned)? {
                self.pending.drain(..used);
                return Ok(out);
            }
            scanned = self.pending.len();
            if self.pending.len() > MAX_OUTPUT / 3 * 4 + 64 {
                self.busy = Some("a reply that was too large".into());
                return Err(ShellError::TooLarge);
            }
            self.fill(start, deadline)?;
        }
    }

    /// One bounded read into `pending` (a timeout or signal is not an error here; running
    /// past `deadline` is).
    fn fill(&mut self, start: Instant, deadline: Instant) -> Result<(), ShellError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ShellError::Timeout(now - start));
        }
        self.stream.set_read_deadline(Some(deadline - now))?;
        match self.stream.read(&mut self.chunk) {
            Ok(0) => Err(ShellError::Closed),
            Ok(n) => {
                self.pending.extend_from_slice(&self.chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn out(status: i32, stdout: &[u8]) -> CommandOutput {
        CommandOutput {
            status,
            stdout: stdout.to_vec(),
        }
    }

    #[test]
    fn frame_quotes_and_asks_for_status_in_the_same_reply() {
        let text = frame("echo 'hi'", Framing::Text).unwrap();
        assert!(text.starts_with(r#"__o=$( __b=${!-}; trap 'if [[ ${!-} != "$__b" ]]; then "#));
        assert!(text.contains(
            r#"; printf "\37"' EXIT; eval 'echo '\''hi'\''' </dev/null 7<&- ); __s=$?;"#
        ));
        assert!(text.ends_with("unset __o __s __l\n"));
        assert_eq!(text.matches('\n').count(), 1, "one line per command");
        assert_eq!(
            frame("echo 'hi'", Framing::Exact).unwrap(),
            r#"printf 'B '; ( eval 'echo '\''hi'\''' ) </dev/null 7<&- | base64 -w 0; echo " ${PIPESTATUS[0]}""#
                .to_string()
                + "\n"
        );
        assert!(matches!(
            frame("a\0b", Framing::Text),
            Err(ShellError::NulInCommand)
        ));
    }

    #[test]
    fn limited_frame_is_one_line_with_the_watchdog() {
        let line =
            frame_limited("sleep 9", Framing::Text, Some(Duration::from_millis(1500))).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "one line per command");
        assert!(line.contains("read -t 1.500;"), "{line}");
        assert!(line.contains("kill -TERM -- -${__st[4]}"), "{line}");
        // No limit, or a zero one: the plain frame.
        assert_eq!(
            frame_limited("x", Framing::Text, Some(Duration::ZERO)).unwrap(),
            frame("x", Framing::Text).unwrap()
        );
        assert!(!frame("x", Framing::Text).unwrap().contains("set -m"));
    }

    #[test]
    fn text_replies_parse_by_length() {
        assert_eq!(
            parse_reply(b"T 0 3\nhi\n\n", 0).unwrap(),
            Some((out(0, b"hi\n"), 10))
        );
        // The body may hold newlines and what looks like another header.
        let reply = b"T 3 8\nT 1 2\nx\n\nT 0 0\n\n";
        assert_eq!(
            parse_reply(reply, 0).unwrap(),
            Some((out(3, b"T 1 2\nx\n"), 15))
        );
        assert_eq!(
            parse_reply(&reply[15..], 0).unwrap(),
            Some((out(0, b""), 7))
        );
    }

    #[test]
    fn incomplete_replies_wait_for_more() {
        for partial in [
            &b""[..],
            b"T",
            b"T 0",
            b"T 0 3\nhi",
            b"T 0 3\nhi\n",
            b"B aGkK",
        ] {
            assert_eq!(parse_reply(partial, 0).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn exact_replies_parse() {
        assert_eq!(
            parse_reply(b"B aGkK 0\nrest", 0).unwrap(),
            Some((out(0, b"hi\n"), 9))
        );
        assert_eq!(parse_reply(b"B  3\n", 0).unwrap(), Some((out(3, b""), 5)));
    }

    #[test]
    fn garbled_replies_are_errors() {
        for bad in [
            &b"garbage\n"[..],
            b"B !!!! 0\n",
            b"T x 3\nabc\n",
            b"T 0 3\nabcd",
            b"T 0 3 4\nabc\n",
            b"T 0 99999999999999999999999999999999999999999999999999999999999999999999",
        ] {
            assert!(
                matches!(parse_reply(bad, 0), Err(ShellError::Protocol(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_reply(b"T 0 999999999999\n", 0),
            Err(ShellError::TooLarge)
        ));
    }

    proptest! {
        #[test]
        fn any_output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4000), status in 0i32..256, split in 0usize..5000) {
            let mut text = format!("T {status} {}\n", data.len()).into_bytes();
            text.extend_from_slice(&data);
            text.push(b'\n');
            let exact = format!("B {} {status}\n", base64::engine::general_purpose::STANDARD.encode(&data)).into_bytes();
            for reply in [text, exact] {
                // A prefix is incomplete, never wrong; the whole parses exactly.
                let cut = split.min(reply.len() - 1);
                prop_assert_eq!(parse_reply(&reply[..cut], 0).unwrap(), None);
                let (got, used) = parse_reply(&reply, 0).unwrap().unwrap();
                prop_assert_eq!(got.stdout, data.clone());
                prop_assert_eq!(got.status, status);
                prop_assert_eq!(used, reply.len());
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), scanned in 0usize..400) {
            let _ = parse_reply(&data, scanned);
        }
    }
}
