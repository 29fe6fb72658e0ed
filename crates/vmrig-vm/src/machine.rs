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
/// How long `send_console` waits for QEMU to take its input.
const SEND_CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);
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
    name: String,
    /// The writable disk (saved with a snapshot); unknown for a start command's VM.
    disk: Option<PathBuf>,
    qemu: GuardedChild,
    console: Arc<Console>,
    stderr: StderrTail,
    /// The serial console's input (QEMU's stdin), for `send_console`.
    stdin: Option<std::process::ChildStdin>,
    shell: Option<Shell<UnixStream>>,
    shell_listener: UnixListener,
    qmp: Option<Qmp<UnixStream>>,
    qmp_endpoint: QmpEndpoint,
    /// A start command's human monitor: QEMU connects to the driver, which keeps it open.
    monitor: Option<(UnixListener, Option<UnixStream>)>,
    needs_banner: bool,
    /// The thread that copies the serial console into the log (see [`Vm::kill`]).
    console_reader: Option<std::thread::JoinHandle<()>>,
}

/// How the driver reaches QEMU's QMP.
enum QmpEndpoint {
    /// vmrig's command line: QEMU connects to the driver's socket.
    Listen(UnixListener),
    /// A NixOS start command: QEMU listens (`server=on,wait=off`), the driver connects.
    Connect(PathBuf),
}

/// A machine started by a NixOS-style start command (a `run-<name>-vm` script, or any
/// command that starts QEMU and passes on its arguments), as the NixOS driver does it.
#[derive(Debug, Clone)]
pub struct StartCommand {
    pub name: String,
    /// A shell command line; the driver's options are appended to it.
    pub command: String,
    /// The working directory, `TMPDIR` and home of the sockets (`vm-state-<name>`).
    pub state_dir: PathBuf,
    /// Extra environment (`SHARED_DIR`, `QEMU_VDE_SOCKET_<n>`, ...).
    pub env: Vec<(String, String)>,
    pub allow_reboot: bool,
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
        cmd.args(qemu_args(&cfg));
        let spawned = spawn_qemu(cmd, qemu.display().to_string())?;
        let mut vm = Vm::new(
            cfg.name.clone(),
            spawned,
            shell_listener,
            QmpEndpoint::Listen(qmp_listener),
        );
        vm.disk = Some(cfg.disk.clone());
        vm.start_console(serial_log, console, sink)?;
        Ok(vm)
    }

    /// Starts a machine from a NixOS start command: in its state directory, with the
    /// environment a NixOS driver gives it (`TMPDIR`, `USE_TMPDIR`, plus `sc.env`) and the
    /// driver's options appended ([`crate::cmdline::nixos_driver_args`]).
    pub fn launch_start_command(
        sc: &StartCommand,
        serial_log: &Path,
        console: Arc<Console>,
        sink: LineSink,
    ) -> Result<Vm, VmError> {
        std::fs::create_dir_all(&sc.state_dir)
            .map_err(io_err(format!("creating {}", sc.state_dir.display())))?;
        let sockets = crate::cmdline::NixosSockets {
            qmp: sc.state_dir.join("qmp"),
            monitor: sc.state_dir.join("monitor"),
            shell: sc.state_dir.join("shell"),
        };
        for path in [&sockets.qmp, &sockets.monitor, &sockets.shell] {
            check_socket_path(path)?;
        }
        let _ = std::fs::remove_file(&sockets.qmp);
        let shell_listener = listen(&sockets.shell)?;
        let monitor_listener = listen(&sockets.monitor)?;
        let nographic =
            std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none();
        let appended: Vec<String> =
            crate::cmdline::nixos_driver_args(&sockets, sc.allow_reboot, nographic)
                .iter()
                .map(|a| crate::backdoor::shell_quote(a))
                .collect();
        // `exec`: QEMU keeps the spawned pid (the switch names VDE ports by pid), as it does
        // when the start script itself `exec`s QEMU.
        let line = format!("exec {} {}", sc.command, appended.join(" "));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&line)
            .current_dir(&sc.state_dir)
            .env("TMPDIR", &sc.state_dir)
            .env("USE_TMPDIR", "1")
            .envs(sc.env.iter().map(|(k, v)| (k, v)));
        let spawned = spawn_qemu(cmd, sc.command.clone())?;
        let mut vm = Vm::new(
            sc.name.clone(),
            spawned,
            shell_listener,
            QmpEndpoint::Connect(sockets.qmp),
        );
        vm.monitor = Some((monitor_listener, None));
        vm.start_console(serial_log, console, sink)?;
        Ok(vm)
    }

    fn new(
        name: String,
        (qemu, stdin, stderr): (GuardedChild, Option<std::process::ChildStdin>, StderrTail),
        shell_listener: UnixListener,
        qmp_endpoint: QmpEndpoint,
    ) -> Vm {
        Vm {
            name,
            disk: None,
            qemu,
            console: Console::new(),
            stderr,
            stdin,
            shell: None,
            shell_listener,
            qmp: None,
            qmp_endpoint,
            monitor: None,
            needs_banner: false,
            console_reader: None,
        }
    }

    /// Reads QEMU's stdout (the serial console) into `console`, `serial_log` and `sink`.
    fn start_console(
        &mut self,
        serial_log: &Path,
        console: Arc<Console>,
        sink: LineSink,
    ) -> Result<(), VmError> {
        let stdout = self.qemu.child_mut().stdout.take().expect("piped");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(serial_log)
            .map_err(io_err(format!("opening {}", serial_log.display())))?;
        console.reopen();
        self.console_reader = Some(console.spawn_reader(&self.name, stdout, Some(log), sink));
        self.console = console;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names the writable disk of a start command's VM (which its script chose), so that
    /// [`Vm::save_state`] can save it.
    pub fn set_disk(&mut self, disk: PathBuf) {
        self.disk = Some(disk);
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
        match shell
            .wait_for_banner(deadline)
            .and_then(|()| shell.release_terminal(deadline))
        {
            Ok(()) => {
                self.shell = Some(shell);
                Ok(())
            }
            Err(ShellError::Timeout(_)) => Err(VmError::BootTimeout {
                machine: self.name.clone(),
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
        let name = self.name.clone();
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
                let stderr = self.stderr.text();
                return Err(VmError::RestoreFailed {
                    machine: name,
                    detail: format!("the saved state did not load in time (QEMU is {status:?}; migration {migration}; stderr: {stderr:?})"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // No release of the console as the shell's terminal here: states are saved after
        // the first connect released it, and a state of an older frame never loads (the
        // snapshot key has the snapshot format). Every round trip right after a restore is
        // slow under TCG (nothing translated yet): this saves one.
        let shell = Shell::new(stream);
        self.shell = Some(shell);
        Ok(())
    }

    /// Saves the running VM into `dir`: the migration stream (`state`), a copy of the disk
    /// overlay as it was at that instant (`disk.qcow2`) and the console's output up to
    /// then ([`CONSOLE_FILE`]), then lets the VM go on.
    pub fn save_state(&mut self, dir: &Path, deadline: Instant) -> Result<(), VmError> {
        let name = self.name.clone();
        let qmp_err = |source| VmError::Qmp {
            machine: name.clone(),
            source,
        };
        let state = dir.join("state");
        let disk = self.disk.clone().ok_or_else(|| VmError::SaveFailed {
            machine: name.clone(),
            detail: "the disk of a machine started by a start command is not known".into(),
        })?;
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
        // The guest is stopped: once the reader has caught up with what QEMU wrote, the
        // console holds the whole boot.
        let console = settled_console_text(&self.console);
        let console_file = dir.join(CONSOLE_FILE);
        let written = std::fs::write(&console_file, console);
        let qmp = self.qmp()?;
        qmp.cont().map_err(qmp_err)?;
        copied.map_err(io_err(format!("copying {}", disk.display())))?;
        written.map_err(io_err(format!("writing {}", console_file.display())))?;
        Ok(())
    }

    fn died_booting(&mut self) -> VmError {
        let status = self
            .qemu
            .wait_timeout(Duration::from_secs(2))
            .ok()
            .flatten();
        VmError::DiedBooting {
            machine: self.name.clone(),
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
        self.connect_qmp(connect_deadline)?;
        Ok(stream)
    }

    /// Connects QMP (and a start command's monitor) unless connected: QEMU opens them at
    /// start-up, so QMP works before the guest has booted (`block()`, screenshots).
    fn connect_qmp(&mut self, deadline: Instant) -> Result<(), VmError> {
        if self.qmp.is_some() {
            return Ok(());
        }
        let qmp = match &self.qmp_endpoint {
            QmpEndpoint::Listen(listener) => {
                let listener = listener.try_clone().map_err(io_err("qmp socket"))?;
                self.accept(&listener, "QMP", deadline)?
            }
            QmpEndpoint::Connect(path) => {
                let path = path.clone();
                self.connect_to(&path, "QMP", deadline)?
            }
        };
        if let Some((listener, stream @ None)) = self.monitor.as_mut() {
            // QEMU connected at start-up (it waits for that); keep it open.
            listener
                .set_nonblocking(true)
                .map_err(io_err("monitor socket"))?;
            *stream = listener.accept().ok().map(|(s, _)| s);
        }
        let qmp = match Qmp::handshake(qmp, CONNECT_TIMEOUT) {
            Ok(qmp) => qmp,
            // QEMU that exits while the driver connects (a guest that panics at once) is a
            // failed boot, shown with its console, not a protocol error.
            Err(_)
                if matches!(
                    self.qemu.wait_timeout(Duration::from_millis(500)),
                    Ok(Some(_))
                ) =>
            {
                return Err(self.died_booting())
            }
            Err(source) => {
                return Err(VmError::Qmp {
                    machine: self.name.clone(),
                    source,
                })
            }
        };
        self.qmp = Some(qmp);
        Ok(())
    }

    fn accept(
        &mut self,
        listener: &UnixListener,
        what: &'static str,
        deadline: Instant,
    ) -> Result<UnixStream, VmError> {
        listener.set_nonblocking(true).map_err(io_err("socket"))?;
        self.wait_for_stream(what, deadline, || match listener.accept() {
            Ok((stream, _)) => Ok(Some(stream)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io_err(format!("accepting the {what} connection"))(e)),
        })
    }

    /// Connects to a socket QEMU listens on, once it exists.
    fn connect_to(
        &mut self,
        path: &Path,
        what: &'static str,
        deadline: Instant,
    ) -> Result<UnixStream, VmError> {
        self.wait_for_stream(what, deadline, || match UnixStream::connect(path) {
            Ok(stream) => Ok(Some(stream)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io_err(format!("connecting to the {what} socket"))(e)),
        })
    }

    /// Polls `attempt` until it yields a stream, QEMU exits, or `deadline` passes.
    fn wait_for_stream(
        &mut self,
        what: &'static str,
        deadline: Instant,
        mut attempt: impl FnMut() -> Result<Option<UnixStream>, VmError>,
    ) -> Result<UnixStream, VmError> {
        loop {
            if let Some(stream) = attempt()? {
                stream.set_nonblocking(false).map_err(io_err("socket"))?;
                return Ok(stream);
            }
            if let Ok(Some(status)) = self.qemu.try_wait() {
                return Err(VmError::EarlyExit {
                    machine: self.name.clone(),
                    status: status.to_string(),
                    stderr: self.stderr.settled(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::ConnectTimeout {
                    machine: self.name.clone(),
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
        self.execute_with_input(command, None, deadline)
    }

    /// Runs a command in the guest's shell; `input` (if any) is its stdin.
    pub fn execute_with_input(
        &mut self,
        command: &str,
        input: Option<&[u8]>,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, VmError> {
        self.run_command(Run::Wait { input, limit: None }, command, deadline)
            .map(|out| out.expect("a reply"))
    }

    /// Runs a command that the guest kills after `limit` (status 124, as NixOS's `timeout`);
    /// `deadline` bounds the wait for its reply.
    pub fn execute_limited(
        &mut self,
        command: &str,
        limit: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, VmError> {
        let how = Run::Wait { input: None, limit };
        self.run_command(how, command, deadline)
            .map(|out| out.expect("a reply"))
    }

    /// Sends a command and returns at once; its reply is read (and dropped) before the
    /// next command's (NixOS's `execute(check_output=False)`).
    pub fn execute_detached(
        &mut self,
        command: &str,
        limit: Option<Duration>,
        deadline: Instant,
    ) -> Result<(), VmError> {
        self.run_command(Run::Detached { limit }, command, Some(deadline))
            .map(|_| ())
    }

    fn run_command(
        &mut self,
        how: Run,
        command: &str,
        deadline: Option<Instant>,
    ) -> Result<Option<CommandOutput>, VmError> {
        let name = self.name.clone();
        let shell = self.shell.as_mut().ok_or(VmError::NotRunning {
            machine: name.clone(),
        })?;
        let shell_err = |source| VmError::Shell {
            machine: name.clone(),
            source,
        };
        if self.needs_banner {
            let deadline = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(600));
            shell.wait_for_banner(deadline).map_err(shell_err)?;
            shell.release_terminal(deadline).map_err(shell_err)?;
            self.needs_banner = false;
        }
        match how {
            Run::Wait {
                input: Some(input), ..
            } => shell.run_with_input(command, input, deadline).map(Some),
            Run::Wait { input: None, limit } => {
                shell.run_limited(command, limit, deadline).map(Some)
            }
            Run::Detached { limit } => {
                let deadline =
                    deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(600));
                shell.send_detached(command, limit, deadline).map(|()| None)
            }
        }
        .map_err(shell_err)
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

    /// Types `chars` on the serial console. Bounded: a guest that does not read its
    /// serial port cannot block the driver once QEMU's input pipe is full.
    pub fn send_console(&mut self, chars: &[u8]) -> Result<(), VmError> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let stdin = self.stdin.as_mut().ok_or(VmError::NotRunning {
            machine: self.name.clone(),
        })?;
        let fd = stdin.as_raw_fd();
        // SAFETY: fcntl on a pipe fd this Vm owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let deadline = Instant::now() + SEND_CONSOLE_TIMEOUT;
        let mut rest = chars;
        while !rest.is_empty() {
            match stdin.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(VmError::Io {
                            context: format!(
                                "`{}`: the serial console took no input for {SEND_CONSOLE_TIMEOUT:?} ({} of {} bytes sent)",
                                self.name,
                                chars.len() - rest.len(),
                                chars.len()
                            ),
                            source: e,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("writing to the serial console")(e)),
            }
        }
        Ok(())
    }

    /// The QMP client, once QEMU has connected.
    pub fn qmp(&mut self) -> Result<&mut Qmp<UnixStream>, VmError> {
        if self.qmp.is_none() && self.is_running() {
            self.connect_qmp(Instant::now() + CONNECT_TIMEOUT)?;
        }
        let machine = self.name.clone();
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
        // The console's last lines reach the serial log before the run ends (bounded: a
        // child of QEMU may hold its stdout open).
        if let Some(reader) = self.console_reader.take() {
            let until = Instant::now() + Duration::from_secs(1);
            while !reader.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Vm {
    /// QEMU is killed (if it still runs) and its console's last lines logged.
    fn drop(&mut self) {
        self.kill();
    }
}

/// The file of a saved state that holds the console's output up to the save.
pub const CONSOLE_FILE: &str = "console.log";

/// The console's text once its reader has caught up (no new line for 50 ms, at most 1 s):
/// called while the guest is stopped.
fn settled_console_text(console: &Console) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut seen = console.end();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = console.end();
        if now == seen {
            break;
        }
        seen = now;
    }
    console.text()
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

/// Spawns QEMU (or a start command) guarded, with its serial console on stdout, the
/// console's input on stdin (`send_console`) and stderr collected for error messages.
#[allow(clippy::type_complexity)]
fn spawn_qemu(
    mut cmd: Command,
    program: String,
) -> Result<(GuardedChild, Option<std::process::ChildStdin>, StderrTail), VmError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        GuardedChild::spawn(cmd).map_err(|source| VmError::Spawn { program, source })?;
    let stdin = child.child_mut().stdin.take();
    let mut stderr_pipe = child.child_mut().stderr.take().expect("piped");
    let text = Arc::new(Mutex::new(String::new()));
    let buf_text = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr_pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut s = buf_text.lock().unwrap();
            if s.len() < 64 * 1024 {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    Ok((child, stdin, StderrTail { text, reader }))
}

/// What QEMU wrote to stderr (the first 64 KiB), read by a thread of its own.
struct StderrTail {
    text: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrTail {
    /// What was read so far.
    fn text(&self) -> String {
        self.text.lock().unwrap().trim().to_owned()
    }

    /// Once QEMU has exited: all it wrote, when the reader reaches the end within a second
    /// (a loaded host may take a while to schedule it; a child of QEMU that keeps the pipe
    /// open must not hold the error back).
    fn settled(&self) -> String {
        let until = Instant::now() + Duration::from_secs(1);
        while !self.reader.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.text()
    }
}

/// A unix socket path must fit `sun_path` (107 bytes and a NUL).
fn check_socket_path(path: &Path) -> Result<(), VmError> {
    if path.as_os_str().len() > 107 {
        return Err(VmError::Io {
            context: format!("socket path {}", path.display()),
            source: std::io::Error::other(
                "longer than the 107 bytes a unix socket address holds; use a shorter TMPDIR or state directory",
            ),
        });
    }
    Ok(())
}

fn listen(path: &PathBuf) -> Result<UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))
}

/// How [`Vm::run_command`] runs a command.
enum Run<'a> {
    /// Waits for the reply; `input` is the command's stdin, `limit` its time limit.
    Wait {
        input: Option<&'a [u8]>,
        limit: Option<Duration>,
    },
    /// Returns once the command is sent.
    Detached { limit: Option<Duration> },
}
