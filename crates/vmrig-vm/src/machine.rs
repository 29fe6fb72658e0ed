//! One running QEMU: its process, serial console, backdoor shell and QMP socket.
//!
//! The driver owns a [`Vm`] per booted machine; everything here has a deadline.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backdoor::{CommandOutput, Shell, ShellError};
use crate::cmdline::{qemu_args, VmConfig};
use crate::process::GuardedChild;
use crate::qmp::{Qmp, QmpError};
use crate::serial::{Console, LineSink};

/// How long QEMU gets to connect its sockets after it starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Console lines shown with an error.
pub const ERROR_CONSOLE_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("could not start QEMU (`{program}`): {source}; install it with `sudo apt-get install qemu-system-x86`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU for `{machine}` exited during start-up ({status}):\n{stderr}")]
    EarlyExit {
        machine: String,
        status: String,
        stderr: String,
    },
    #[error("QEMU for `{machine}` did not connect its {what} socket within {timeout:?}")]
    ConnectTimeout {
        machine: String,
        what: &'static str,
        timeout: Duration,
    },
    #[error("`{machine}` did not start its backdoor shell within {timeout:?}; last console lines:\n{console}")]
    BootTimeout {
        machine: String,
        timeout: Duration,
        console: String,
    },
    #[error(
        "`{machine}` stopped before its shell came up ({status}); last console lines:\n{console}"
    )]
    DiedBooting {
        machine: String,
        status: String,
        console: String,
    },
    #[error("`{machine}`: {source}")]
    Shell {
        machine: String,
        #[source]
        source: ShellError,
    },
    #[error("`{machine}`: {source}")]
    Qmp {
        machine: String,
        #[source]
        source: QmpError,
    },
    #[error("`{machine}`: could not save its state: {detail}")]
    SaveFailed { machine: String, detail: String },
    #[error("`{machine}`: could not restore its saved state: {detail}")]
    RestoreFailed { machine: String, detail: String },
    #[error("`{machine}`: the machine is not running")]
    NotRunning { machine: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let context = context.into();
    move |source| VmError::Io { context, source }
}

/// A booted (or booting) QEMU.
pub struct Vm {
    cfg: VmConfig,
    qemu: GuardedChild,
    console: Arc<Console>,
    stderr: Arc<Mutex<String>>,
    /// The serial console's input (QEMU's stdin), for `send_console`.
    stdin: Option<std::process::ChildStdin>,
    shell: Option<Shell<UnixStream>>,
    shell_listener: UnixListener,
    qmp: Option<Qmp<UnixStream>>,
    qmp_listener: UnixListener,
    needs_banner: bool,
}

impl Vm {
    /// Starts QEMU (`qemu` is the binary) with `cfg`. The serial console is appended to
    /// `serial_log` and each line handed to `sink`; `console` keeps the history across
    /// restarts of the same machine.
    pub fn launch(
        qemu: &Path,
        cfg: VmConfig,
        serial_log: &Path,
        console: Arc<Console>,
        sink: LineSink,
    ) -> Result<Vm, VmError> {
        let shell_listener = listen(&cfg.shell_socket)?;
        let qmp_listener = listen(&cfg.qmp_socket)?;
        let mut cmd = Command::new(qemu);
        cmd.args(qemu_args(&cfg))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = GuardedChild::spawn(cmd).map_err(|source| VmError::Spawn {
            program: qemu.display().to_string(),
            source,
        })?;
        let stdin = child.child_mut().stdin.take();
        let stdout = child.child_mut().stdout.take().expect("piped");
        let mut stderr_pipe = child.child_mut().stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_buf = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = stderr_buf.lock().unwrap();
                if s.len() < 64 * 1024 {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(serial_log)
            .map_err(io_err(format!("opening {}", serial_log.display())))?;
        console.reopen();
        console.spawn_reader(&cfg.name, stdout, Some(log), sink);
        Ok(Vm {
            cfg,
            qemu: child,
            console,
            stderr,
            stdin,
            shell: None,
            shell_listener,
            qmp: None,
            qmp_listener,
            needs_banner: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    pub fn pid(&self) -> u32 {
        self.qemu.id()
    }

    /// Waits for QEMU to connect and the guest's shell to announce itself.
    pub fn wait_until_ready(&mut self, deadline: Instant) -> Result<(), VmError> {
        let stream = self.connect_sockets(deadline)?;
        let mut shell = Shell::new(stream);
        let start = Instant::now();
        match shell.wait_for_banner(deadline) {
            Ok(()) => {
                self.shell = Some(shell);
                Ok(())
            }
            Err(ShellError::Timeout(_)) => Err(VmError::BootTimeout {
                machine: self.cfg.name.clone(),
                timeout: start.elapsed(),
                console: self.console_tail(),
            }),
            Err(_) => Err(self.died_booting()),
        }
    }

    /// For a VM started from a saved state (`VmConfig::incoming`): accepts QEMU's sockets
    /// and waits until the incoming migration has finished and the guest runs. The guest's
    /// shell was already up when the state was saved, so there is no banner to wait for.
    pub fn wait_until_restored(&mut self, deadline: Instant) -> Result<(), VmError> {
        let stream = self.connect_sockets(deadline)?;
        // Loading a saved state takes a second or two; far longer means it is stuck.
        let deadline = deadline.min(Instant::now() + Duration::from_secs(60));
        let name = self.cfg.name.clone();
        let qmp_err = |source| VmError::Qmp {
            machine: name.clone(),
            source,
        };
        loop {
            let status = self.qmp()?.query_status().map_err(qmp_err)?;
            match status.as_str() {
                "running" => break,
                // Saved while stopped: once the state is in, let it run.
                "paused" | "postmigrate" => {
                    let migration = self
                        .qmp()?
                        .execute("query-migrate", None, Duration::from_secs(10))
                        .map_err(qmp_err)?;
                    if migration.get("status").and_then(|s| s.as_str()) == Some("completed") {
                        self.qmp()?.cont().map_err(qmp_err)?;
                    }
                }
                "inmigrate" | "prelaunch" | "restore-vm" => {}
                other => {
                    return Err(VmError::RestoreFailed {
                        machine: name,
                        detail: format!("the VM is in state {other:?} after restoring"),
                    })
                }
            }
            if !self.is_running() {
                return Err(self.died_booting());
            }
            if Instant::now() >= deadline {
                let migration = self
                    .qmp()?
                    .execute("query-migrate", None, Duration::from_secs(5))
                    .unwrap_or_default();
                let stderr = self.stderr.lock().unwrap().trim().to_owned();
                return Err(VmError::RestoreFailed {
                    machine: name,
                    detail: format!("the saved state did not load in time (QEMU is {status:?}; migration {migration}; stderr: {stderr:?})"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shell = Some(Shell::new(stream));
        Ok(())
    }

    /// Saves the running VM into `dir`: the migration stream (`state`) and a copy of the
    /// disk overlay as it was at that instant (`disk.qcow2`), then lets the VM go on.
    pub fn save_state(&mut self, dir: &Path, deadline: Instant) -> Result<(), VmError> {
        let name = self.cfg.name.clone();
        let qmp_err = |source| VmError::Qmp {
            machine: name.clone(),
            source,
        };
        let state = dir.join("state");
        let disk = self.cfg.disk.clone();
        let uri = format!(
            "exec:cat > {}",
            crate::backdoor::shell_quote(&state.to_string_lossy())
        );
        let qmp = self.qmp()?;
        // Migrated while running (QEMU stops the VM for the last pass and leaves it stopped):
        // the saved run state is "running", so a restored VM runs by itself, without waiting
        // for the driver to connect (machines that are started but not yet used must run).
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": uri })),
            Duration::from_secs(30),
        )
        .map_err(qmp_err)?;
        loop {
            let info = qmp
                .execute("query-migrate", None, Duration::from_secs(30))
                .map_err(qmp_err)?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let detail = info
                        .get("error-desc")
                        .and_then(|d| d.as_str())
                        .unwrap_or("migration failed")
                        .to_owned();
                    let _ = qmp.cont();
                    return Err(VmError::SaveFailed {
                        machine: name,
                        detail,
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = qmp.execute("migrate_cancel", None, Duration::from_secs(10));
                let _ = qmp.cont();
                return Err(VmError::SaveFailed {
                    machine: name,
                    detail: "saving the state took too long".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let copied = std::fs::copy(&disk, dir.join("disk.qcow2"));
        qmp.cont().map_err(qmp_err)?;
        copied.map_err(io_err(format!("copying {}", disk.display())))?;
        Ok(())
    }

    fn died_booting(&mut self) -> VmError {
        let status = self
            .qemu
            .wait_timeout(Duration::from_secs(2))
            .ok()
            .flatten();
        VmError::DiedBooting {
            machine: self.cfg.name.clone(),
            status: status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "still running".into()),
            console: self.console_tail(),
        }
    }

    /// Accepts QEMU's shell and QMP connections and does the QMP handshake.
    fn connect_sockets(&mut self, deadline: Instant) -> Result<UnixStream, VmError> {
        let connect_deadline = deadline.min(Instant::now() + CONNECT_TIMEOUT);
        let stream = self.accept(
            &self
                .shell_listener
                .try_clone()
                .map_err(io_err("shell socket"))?,
            "shell",
            connect_deadline,
        )?;
        let qmp = self.accept(
            &self
                .qmp_listener
                .try_clone()
                .map_err(io_err("qmp socket"))?,
            "QMP",
            connect_deadline,
        )?;
        let qmp = Qmp::handshake(qmp, CONNECT_TIMEOUT).map_err(|source| VmError::Qmp {
            machine: self.cfg.name.clone(),
            source,
        })?;
        self.qmp = Some(qmp);
        Ok(stream)
    }

    fn accept(
        &mut self,
        listener: &UnixListener,
        what: &'static str,
        deadline: Instant,
    ) -> Result<UnixStream, VmError> {
        listener.set_nonblocking(true).map_err(io_err("socket"))?;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(io_err("socket"))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(format!("accepting the {what} connection"))(e)),
            }
            if let Ok(Some(status)) = self.qemu.try_wait() {
                std::thread::sleep(Duration::from_millis(50)); // let the stderr thread catch up
                return Err(VmError::EarlyExit {
                    machine: self.cfg.name.clone(),
                    status: status.to_string(),
                    stderr: self.stderr.lock().unwrap().trim().to_owned(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::ConnectTimeout {
                    machine: self.cfg.name.clone(),
                    what,
                    timeout: CONNECT_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last console lines, indented, for error messages.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }

    /// Runs a command in the guest's shell.
    pub fn execute(
        &mut self,
        command: &str,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, VmError> {
        let name = self.cfg.name.clone();
        let shell = self.shell.as_mut().ok_or(VmError::NotRunning {
            machine: name.clone(),
        })?;
        if self.needs_banner {
            let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(600));
            shell
                .wait_for_banner(deadline)
                .map_err(|source| VmError::Shell {
                    machine: name.clone(),
                    source,
                })?;
            self.needs_banner = false;
        }
        shell
            .run(command, deadline)
            .map_err(|source| VmError::Shell {
                machine: name,
                source,
            })
    }

    /// Sends a command without waiting for a reply (e.g. `poweroff`), dropping the shell.
    pub fn send_and_forget(&mut self, command: &str) -> Result<(), VmError> {
        use std::io::Write;
        if let Some(mut shell) = self.shell.take() {
            let line = format!("{command}\n");
            shell
                .stream_mut()
                .write_all(line.as_bytes())
                .map_err(io_err("writing to the guest shell"))?;
        }
        Ok(())
    }

    /// Types `chars` on the serial console.
    pub fn send_console(&mut self, chars: &[u8]) -> Result<(), VmError> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().ok_or(VmError::NotRunning {
            machine: self.cfg.name.clone(),
        })?;
        stdin
            .write_all(chars)
            .and_then(|()| stdin.flush())
            .map_err(io_err("writing to the serial console"))
    }

    /// The QMP client, once QEMU has connected.
    pub fn qmp(&mut self) -> Result<&mut Qmp<UnixStream>, VmError> {
        let machine = self.cfg.name.clone();
        self.qmp.as_mut().ok_or(VmError::NotRunning { machine })
    }

    /// Marks the shell as gone until the guest announces a new one (after a reboot).
    pub fn expect_new_shell(&mut self) {
        self.needs_banner = true;
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// Waits for QEMU to exit, up to `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, VmError> {
        let status = self
            .qemu
            .wait_timeout(timeout)
            .map_err(io_err("waiting for QEMU"))?;
        if status.is_some() {
            self.shell = None;
        }
        Ok(status)
    }

    /// Kills QEMU at once (NixOS's `crash()`).
    pub fn kill(&mut self) {
        self.shell = None;
        self.qemu.kill();
    }
}

/// The last console lines of `console`, indented, for error messages.
pub fn console_tail(console: &Console) -> String {
    let lines = console.tail(ERROR_CONSOLE_LINES);
    if lines.is_empty() {
        return "    (no console output)".into();
    }
    lines
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn listen(path: &PathBuf) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))
}
