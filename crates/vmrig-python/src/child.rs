//! The CPython child: spawning it, serving its requests, killing it.

use crate::error::BridgeError;
use crate::rpc::{response, Handler, Request};
use crate::syntax::{probe_python, ScriptSource};
use crate::{MachineInfo, MODULE_FILE_NAME, PYTHON_MAIN, PYTHON_MODULE};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MAIN_FILE_NAME: &str = "vmrig_test_main.py";
const SCRIPT_FILE_NAME: &str = "vmrig_test_script.py";

/// What the script gets to know about the test.
#[derive(Debug, Clone)]
pub struct ScriptContext {
    /// In the order the script's `machines` list should have (upstream: by name).
    pub machines: Vec<MachineInfo>,
    pub vlans: Vec<u8>,
    /// The test's output directory (`machine.out_dir`, `driver.out_dir`).
    pub out_dir: PathBuf,
    /// Where the module, the main file and the script text are written.
    pub work_dir: PathBuf,
}

/// Run the script, or give the user a Python REPL with the same globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Script,
    Interactive,
    /// Run the script; where it fails (or at Ctrl-C, or at the global timeout), open the
    /// REPL with the failing frame's names, the machines still running.
    PauseOnFailure,
}

impl Mode {
    /// Whether the script talks to the user's terminal (stdin, Ctrl-C).
    pub fn is_interactive(self) -> bool {
        self != Mode::Script
    }
}

/// How a script run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// The script ran to the end (or the REPL was left).
    Passed,
    /// The script raised. `line` is in the user's file; `traceback` is
    /// "Traceback (most recent call last):" and the frames (only the script's
    /// own for test failures), without the final "Type: message" line.
    Failed {
        exc_type: String,
        message: String,
        line: Option<usize>,
        traceback: String,
    },
    /// Ended by [`ScriptKiller::kill`] (or SIGKILL) before it reported.
    Killed,
    /// Exited without reporting (exit code, or 128+signal).
    ExitedWithoutReport(i32),
}

struct KillState {
    pid: libc::pid_t,
    own_group: bool,
    /// True once the child has been reaped: its pid may then be reused.
    reaped: Mutex<bool>,
    killed: AtomicBool,
}

/// Kills the script child from any thread (e.g. on the global timeout).
#[derive(Clone)]
pub struct ScriptKiller {
    state: Arc<KillState>,
}

impl ScriptKiller {
    /// SIGKILL the child (and, in script mode, its whole process group).
    /// Does nothing once the child has been reaped. `serve` then returns
    /// [`ScriptOutcome::Killed`] unless the script had already reported.
    pub fn kill(&self) {
        let reaped = self.state.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if *reaped {
            return;
        }
        self.state.killed.store(true, Ordering::SeqCst);
        let target = if self.state.own_group {
            -self.state.pid
        } else {
            self.state.pid
        };
        // SAFETY: plain syscall; the pid is ours and not yet reaped (the lock
        // is held), so it cannot name another process.
        unsafe {
            libc::kill(target, libc::SIGKILL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.state.pid as u32
    }

    /// SIGINT to the child alone (a `KeyboardInterrupt` in the script: with
    /// [`Mode::PauseOnFailure`] it pauses where it is). Nothing once it is reaped.
    pub fn interrupt(&self) {
        let reaped = self.state.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: plain syscall; the pid is ours and not yet reaped (the lock is held).
            unsafe {
                libc::kill(self.state.pid, libc::SIGINT);
            }
        }
    }
}

impl std::fmt::Debug for ScriptKiller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptKiller")
            .field("pid", &self.state.pid)
            .finish()
    }
}

/// A running script child. Serve it with [`ScriptChild::serve`]; dropping it
/// unserved kills and reaps it.
pub struct ScriptChild {
    child: Option<Child>,
    stream: Option<UnixStream>,
    killer: ScriptKiller,
}

impl ScriptChild {
    /// Write the module next to the script in `ctx.work_dir` and start
    /// `python -B -u <work_dir>/vmrig_test_main.py`.
    ///
    /// The child's stdout and stderr are the caller's; stdin is the caller's
    /// in [`Mode::Interactive`], else /dev/null. In [`Mode::Script`] it runs
    /// in its own process group (a terminal's Ctrl-C reaches only the
    /// driver, which decides); in interactive mode it stays in the caller's
    /// group so it can read the terminal, and the caller should ignore
    /// SIGINT while the REPL runs (Ctrl-C belongs to the REPL).
    ///
    /// The child gets SIGKILL when the spawning *thread* exits
    /// (PR_SET_PDEATHSIG fires on thread exit, not process exit): spawn from
    /// a thread that lives as long as the script, e.g. the one that serves it.
    ///
    /// The socket end is passed as an inherited fd whose number is in the
    /// child's `VMRIG_RPC_FD`; the init data is in `VMRIG_INIT`.
    pub fn spawn(
        python: &Path,
        src: &ScriptSource,
        ctx: &ScriptContext,
        mode: Mode,
    ) -> Result<ScriptChild, BridgeError> {
        probe_python(python)?;
        let dir = &ctx.work_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| BridgeError::io(format!("creating {}", dir.display()), e))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, BridgeError> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| BridgeError::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        };
        write(MODULE_FILE_NAME, PYTHON_MODULE)?;
        let main = write(MAIN_FILE_NAME, PYTHON_MAIN)?;
        let script = write(SCRIPT_FILE_NAME, &src.text)?;

        let init = json!({
            "machines": ctx.machines,
            "vlans": ctx.vlans,
            "out_dir": ctx.out_dir.to_string_lossy(),
            "mode": match mode {
                Mode::Script => "script",
                Mode::Interactive => "interactive",
                Mode::PauseOnFailure => "pause_on_failure",
            },
            "script": {
                "path": script.to_string_lossy(),
                "filename": src.filename.to_string_lossy(),
                "first_line": crate::syntax::first_line(src),
            },
        });

        // Both ends are close-on-exec; the child's end is made inheritable
        // in the child only, and keeps its number (no dup2 onto a fixed fd,
        // which could land on std's own exec-error pipe).
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| BridgeError::io("creating the script socket", e))?;
        let child_fd = theirs.as_raw_fd();

        let mut cmd = Command::new(python);
        cmd.arg("-B")
            .arg("-u")
            .arg(&main)
            .env("VMRIG_RPC_FD", child_fd.to_string())
            .env("VMRIG_INIT", init.to_string())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .stdin(if mode.is_interactive() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        vmrig_vm::process::die_with_parent(&mut cmd, !mode.is_interactive());
        // SAFETY: only async-signal-safe calls (fcntl).
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(child_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| BridgeError::spawn(python, e))?;
        drop(theirs);
        let killer = ScriptKiller {
            state: Arc::new(KillState {
                pid: child.id() as libc::pid_t,
                own_group: mode == Mode::Script,
                reaped: Mutex::new(false),
                killed: AtomicBool::new(false),
            }),
        };
        Ok(ScriptChild {
            child: Some(child),
            stream: Some(ours),
            killer,
        })
    }

    /// A handle that kills the child from another thread.
    pub fn killer(&self) -> ScriptKiller {
        self.killer.clone()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.killer.pid()
    }

    /// Answer the child's requests with `handler` until it reports its end
    /// (`script.finished` / `script.failed`) or closes the socket; then reap
    /// it. A request that is not JSON kills the child and is an error.
    pub fn serve(mut self, handler: &dyn Handler) -> Result<ScriptOutcome, BridgeError> {
        let stream = self.stream.take().expect("served once");
        let mut reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| BridgeError::io("cloning the script socket", e))?,
        );
        let mut report = None;
        let mut broken = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => {
                    broken = Some(format!("reading: {e}"));
                    break;
                }
            }
            let request: Request = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) => {
                    broken = Some(format!(
                        "bad request {:?}: {e}",
                        String::from_utf8_lossy(&line).trim_end()
                    ));
                    break;
                }
            };
            let answer = match request.method.as_str() {
                "script.finished" => {
                    report = Some(ScriptOutcome::Passed);
                    Ok(Value::Null)
                }
                "script.failed" => {
                    report = Some(failed_outcome(&request.params));
                    Ok(Value::Null)
                }
                method => handler.call(method, &request.params),
            };
            if send_all(&stream, response(&request.id, answer).as_bytes()).is_err() {
                break; // the child is gone; its exit status tells the rest
            }
            if report.is_some() {
                break;
            }
        }
        drop(reader);
        drop(stream);
        if broken.is_some() {
            self.killer.kill();
        }
        let status = self.reap()?;
        if let Some(msg) = broken {
            return Err(BridgeError::Protocol(msg));
        }
        if let Some(report) = report {
            return Ok(report);
        }
        if self.killer.state.killed.load(Ordering::SeqCst) || status.signal() == Some(libc::SIGKILL)
        {
            return Ok(ScriptOutcome::Killed);
        }
        Ok(ScriptOutcome::ExitedWithoutReport(
            status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
        ))
    }

    /// Wait for the child to exit without reaping it (so the killer can
    /// never hit a reused pid), mark it reaped under the killer's lock,
    /// then reap it.
    fn reap(&mut self) -> Result<std::process::ExitStatus, BridgeError> {
        let mut child = self.child.take().expect("reaped once");
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: plain syscall on our own child.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    child.id() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break; // child.wait() below reports a real problem
            }
        }
        let mut reaped = self
            .killer
            .state
            .reaped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let status = child
            .wait()
            .map_err(|e| BridgeError::io("waiting for the test script", e));
        *reaped = true;
        status
    }
}

impl Drop for ScriptChild {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stream.take();
            self.killer.kill();
            let _ = self.reap();
        }
    }
}

/// Write without raising SIGPIPE in the driver if the child is gone.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe `bytes`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

fn failed_outcome(params: &Value) -> ScriptOutcome {
    let text = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    ScriptOutcome::Failed {
        exc_type: text("type"),
        message: text("message"),
        line: params
            .get("line")
            .and_then(Value::as_u64)
            .map(|l| l as usize),
        traceback: text("traceback"),
    }
}
