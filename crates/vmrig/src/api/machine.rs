//! [`Machine`]: one machine of a [`Run`], with the NixOS API under Rust names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use vmrig_driver::request::{MachineRequest, Request, Tty};

use super::error::*;
use super::run::Run;

/// One machine of a [`Run`]: upstream's `Machine`, for Rust. A cheap handle (clone it,
/// or ask [`Run::machine`] again); calls to one machine are served one at a time.
///
/// A machine starts on its first command, as upstream: `succeed` on a machine that is
/// not running boots it and waits for its shell.
#[derive(Clone)]
pub struct Machine<'r> {
    run: &'r Run,
    name: String,
    /// Every call's time limit, instead of its default.
    timeout: Option<Duration>,
    /// The systemd user instance the unit calls address.
    user: Option<String>,
}

impl std::fmt::Debug for Machine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl<'r> Machine<'r> {
    /// The handle of `run`'s machine `name` (checked by the caller).
    pub(crate) fn new(run: &'r Run, name: String) -> Machine<'r> {
        Machine {
            run,
            name,
            timeout: None,
            user: None,
        }
    }

    fn call<T: DeserializeOwned>(&self, call: MachineRequest) -> Result<T> {
        self.run.call(Request::Machine {
            machine: self.name.clone(),
            call,
        })
    }

    /// The handle's time limit in seconds, if it has one (else the call's default).
    fn limit(&self) -> Option<f64> {
        self.timeout.map(secs)
    }

    /// The machine's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This machine with `timeout` as the time limit of every call (upstream's
    /// `timeout=` argument): of each command (`succeed`, `fail`, `execute`, ...) and of each
    /// wait (`wait_for_unit`, `wait_until_succeeds`, ...), instead of their defaults.
    ///
    /// ```no_run
    /// # let run = vmrig::Run::from_file("tests/web.toml")?;
    /// use std::time::Duration;
    /// let server = run.machine("server")?;
    /// server.with_timeout(Duration::from_secs(60)).wait_for_unit("nginx.service")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Machine<'r> {
        Machine {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// This machine with its unit calls (`systemctl`, `wait_for_unit`, `get_unit_info`,
    /// `get_unit_property`, `start_job`, `stop_job`) addressed to `user`'s systemd instance
    /// (upstream's `user=` argument).
    pub fn with_user(&self, user: &str) -> Machine<'r> {
        Machine {
            user: Some(user.to_owned()),
            ..self.clone()
        }
    }

    // -- lifecycle

    /// `start()`: boots the machine (without waiting for it); nothing if it runs.
    pub fn start(&self) -> Result<()> {
        self.call(MachineRequest::Start {
            allow_reboot: false,
        })
    }

    /// `start(allow_reboot=True)`: boots the machine so that a reboot in the guest
    /// reboots it (instead of ending QEMU).
    pub fn start_allow_reboot(&self) -> Result<()> {
        self.call(MachineRequest::Start { allow_reboot: true })
    }

    /// `connect()`: starts the machine if needed and waits for its shell.
    pub fn connect(&self) -> Result<()> {
        self.call(MachineRequest::Connect {})
    }

    /// `shutdown()`: powers the guest off and waits until QEMU has exited.
    pub fn shutdown(&self) -> Result<()> {
        self.call(MachineRequest::Shutdown {})
    }

    /// `crash()`: ends QEMU at once, as a power cut.
    pub fn crash(&self) -> Result<()> {
        self.call(MachineRequest::Crash {})
    }

    /// `reboot()`: presses Ctrl+Alt+Delete; the next command waits for the new boot.
    pub fn reboot(&self) -> Result<()> {
        self.call(MachineRequest::Reboot {})
    }

    /// `wait_for_shutdown()`: waits until the machine has powered off.
    pub fn wait_for_shutdown(&self) -> Result<()> {
        self.call(MachineRequest::WaitForShutdown {})
    }

    /// `is_up()`: whether the machine runs and its shell answered.
    pub fn is_up(&self) -> Result<bool> {
        self.call(MachineRequest::IsUp {})
    }

    /// `booted`: whether QEMU runs.
    pub fn is_booted(&self) -> Result<bool> {
        #[derive(serde::Deserialize)]
        struct State {
            booted: bool,
        }
        Ok(self.call::<State>(MachineRequest::State {})?.booted)
    }

    // -- commands

    /// `execute(command)`: runs a shell command (under `set -euo pipefail`), killed after
    /// 900 s (or the handle's timeout, status 124); `(exit status, stdout)`.
    pub fn execute(&self, command: &str) -> Result<(i32, String)> {
        self.call(MachineRequest::Execute {
            command: command.to_owned(),
            timeout: Some(self.limit().unwrap_or(vmrig_driver::DEFAULT_WAIT)),
            check_return: None,
            check_output: None,
        })
    }

    /// `succeed(command)`: runs a shell command that must exit 0 (else
    /// [`Error::Assertion`], with its output and the console's last lines); its stdout.
    ///
    /// ```no_run
    /// # let run = vmrig::Run::from_file("tests/web.toml")?;
    /// let server = run.machine("server")?;
    /// assert_eq!(server.succeed("hostname")?.trim(), "server");
    /// match server.succeed("test -e /nonexistent") {
    ///     Err(vmrig::Error::Assertion(why)) => assert!(why.contains("exit code 1")),
    ///     other => panic!("expected an assertion error, got {other:?}"),
    /// }
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn succeed(&self, command: &str) -> Result<String> {
        self.call(MachineRequest::Succeed {
            commands: vec![command.to_owned()],
            timeout: self.limit(),
        })
    }

    /// `fail(command)`: runs a shell command that must exit non-zero (else
    /// [`Error::Assertion`]); its stdout.
    pub fn fail(&self, command: &str) -> Result<String> {
        self.call(MachineRequest::Fail {
            commands: vec![command.to_owned()],
            timeout: self.limit(),
        })
    }

    /// `wait_until_succeeds(command)`: runs `command` until it exits 0; its stdout.
    /// [`Error::Timeout`] after 900 s (or the handle's timeout), with the last attempt's
    /// output.
    pub fn wait_until_succeeds(&self, command: &str) -> Result<String> {
        self.call(MachineRequest::WaitUntilSucceeds {
            command: command.to_owned(),
            timeout: self.limit(),
            attempt_timeout: None,
        })
    }

    /// `wait_until_fails(command)`: runs `command` until it exits non-zero; its stdout.
    pub fn wait_until_fails(&self, command: &str) -> Result<String> {
        self.call(MachineRequest::WaitUntilFails {
            command: command.to_owned(),
            timeout: self.limit(),
            attempt_timeout: None,
        })
    }

    // -- systemd

    /// `systemctl(q)`: `systemctl q` (of the handle's user, if any); `(exit status,
    /// stdout)`.
    pub fn systemctl(&self, q: &str) -> Result<(i32, String)> {
        self.call(MachineRequest::Systemctl {
            q: q.to_owned(),
            user: self.user.clone(),
        })
    }

    /// `start_job(unit)`: `systemctl start unit`; `(exit status, stdout)`.
    pub fn start_job(&self, unit: &str) -> Result<(i32, String)> {
        self.call(MachineRequest::StartJob {
            jobname: unit.to_owned(),
            user: self.user.clone(),
        })
    }

    /// `stop_job(unit)`: `systemctl stop unit`; `(exit status, stdout)`.
    pub fn stop_job(&self, unit: &str) -> Result<(i32, String)> {
        self.call(MachineRequest::StopJob {
            jobname: unit.to_owned(),
            user: self.user.clone(),
        })
    }

    /// `get_unit_info(unit)`: the unit's properties (`systemctl show`).
    pub fn get_unit_info(&self, unit: &str) -> Result<BTreeMap<String, String>> {
        self.call(MachineRequest::GetUnitInfo {
            unit: unit.to_owned(),
            user: self.user.clone(),
        })
    }

    /// `get_unit_property(unit, property)`: one property of the unit.
    pub fn get_unit_property(&self, unit: &str, property: &str) -> Result<String> {
        self.call(MachineRequest::GetUnitProperty {
            unit: unit.to_owned(),
            property: property.to_owned(),
            user: self.user.clone(),
        })
    }

    /// `wait_for_unit(unit)`: waits until the unit is active; [`Error::Assertion`] when it
    /// failed (or will not start), [`Error::Timeout`] after 900 s (or the handle's timeout).
    pub fn wait_for_unit(&self, unit: &str) -> Result<()> {
        self.call(MachineRequest::WaitForUnit {
            unit: unit.to_owned(),
            user: self.user.clone(),
            timeout: self.limit(),
        })
    }

    /// `wait_for_unit_active_state(unit, state)`: waits until the unit's `ActiveState` is
    /// `state`.
    pub fn wait_for_unit_active_state(&self, unit: &str, state: &str) -> Result<()> {
        self.call(MachineRequest::WaitForUnitActiveState {
            unit: unit.to_owned(),
            state: state.to_owned(),
            user: self.user.clone(),
            timeout: self.limit(),
        })
    }

    /// `require_unit_state(unit, state)`: [`Error::Assertion`] unless the unit's
    /// `ActiveState` is `state` now.
    pub fn require_unit_state(&self, unit: &str, state: &str) -> Result<()> {
        self.call(MachineRequest::RequireUnitState {
            unit: unit.to_owned(),
            require_state: Some(state.to_owned()),
        })
    }

    // -- waits

    /// `wait_for_file(path)`: waits until the file exists in the guest.
    pub fn wait_for_file(&self, path: &str) -> Result<()> {
        self.call(MachineRequest::WaitForFile {
            filename: path.to_owned(),
            timeout: self.limit(),
        })
    }

    /// `wait_for_open_port(port)`: waits until something listens on TCP `port` of the
    /// guest's `localhost`.
    pub fn wait_for_open_port(&self, port: u16) -> Result<()> {
        self.wait_for_open_port_on(port, "localhost")
    }

    /// `wait_for_open_port(port, addr)`: waits until TCP `addr:port` accepts connections
    /// from the guest.
    pub fn wait_for_open_port_on(&self, port: u16, addr: &str) -> Result<()> {
        self.call(MachineRequest::WaitForOpenPort {
            port,
            addr: Some(addr.to_owned()),
            timeout: self.limit(),
        })
    }

    /// `wait_for_closed_port(port)`: waits until nothing listens on TCP `port` of the
    /// guest's `localhost`.
    pub fn wait_for_closed_port(&self, port: u16) -> Result<()> {
        self.call(MachineRequest::WaitForClosedPort {
            port,
            addr: None,
            timeout: self.limit(),
        })
    }

    /// `wait_for_open_unix_socket(path)`: waits until the stream socket accepts
    /// connections.
    pub fn wait_for_open_unix_socket(&self, path: &str) -> Result<()> {
        self.call(MachineRequest::WaitForOpenUnixSocket {
            addr: path.to_owned(),
            is_datagram: None,
            timeout: self.limit(),
        })
    }

    // -- console and QEMU

    /// `wait_for_console_text(regex)`: waits until a line of the serial console (since
    /// the machine's start) matches `regex`.
    pub fn wait_for_console_text(&self, regex: &str) -> Result<()> {
        self.call(MachineRequest::WaitForConsoleText {
            regex: regex.to_owned(),
            timeout: self.limit(),
        })
    }

    /// `get_console_log()`: the serial console's text since the machine's start.
    pub fn get_console_log(&self) -> Result<String> {
        self.call(MachineRequest::GetConsoleLog {})
    }

    /// `send_console(chars)`: types `chars` on the serial console.
    pub fn send_console(&self, chars: &str) -> Result<()> {
        self.call(MachineRequest::SendConsole {
            chars: chars.to_owned(),
        })
    }

    /// `send_monitor_command(command)`: a QEMU monitor (HMP) command; its reply.
    pub fn send_monitor_command(&self, command: &str) -> Result<String> {
        self.call(MachineRequest::SendMonitorCommand {
            command: command.to_owned(),
        })
    }

    /// `forward_port(host_port, guest_port)`: TCP `127.0.0.1:host_port` on the host
    /// reaches `guest_port` of the guest.
    pub fn forward_port(&self, host_port: u16, guest_port: u16) -> Result<()> {
        self.call(MachineRequest::ForwardPort {
            host_port,
            guest_port,
        })
    }

    /// `block()`: takes the machine's links on all its VLANs down.
    pub fn block(&self) -> Result<()> {
        self.call(MachineRequest::Block {})
    }

    /// `unblock()`: brings the machine's links up again.
    pub fn unblock(&self) -> Result<()> {
        self.call(MachineRequest::Unblock {})
    }

    // -- files

    /// `copy_from_host(source, target)`: copies a file or directory of the host to
    /// `target` in the guest (replacing what is there).
    pub fn copy_from_host(&self, source: impl AsRef<Path>, target: &str) -> Result<()> {
        self.call(MachineRequest::CopyFromHost {
            source: utf8(source.as_ref(), "copy_from_host")?,
            target: target.to_owned(),
        })
    }

    /// `copy_from_machine(source, target_dir)`: copies a file or directory of the guest
    /// into `target_dir` of the output directory (`""`: the output directory itself).
    pub fn copy_from_machine(&self, source: &str, target_dir: &str) -> Result<()> {
        self.call(MachineRequest::CopyFromMachine {
            source: source.to_owned(),
            target_dir: Some(target_dir.to_owned()),
        })
    }

    // -- screen and keyboard (nodes with `graphics = true`)

    /// `screenshot(name)`: saves the screen as PNG (`name` without a directory goes into
    /// the output directory, `.png` added when it has no extension); the file's path.
    pub fn screenshot(&self, name: &str) -> Result<PathBuf> {
        self.call::<()>(MachineRequest::Screenshot {
            filename: name.to_owned(),
        })?;
        Ok(vmrig_driver::rpc::screenshot_path(&self.run.out_dir, name))
    }

    /// `send_key(key)`: presses a key combination (`"ctrl-alt-delete"`, `"ret"`).
    pub fn send_key(&self, key: &str) -> Result<()> {
        self.call(MachineRequest::SendKey {
            key: key.to_owned(),
            delay: None,
            log: None,
        })
    }

    /// `send_chars(chars)`: types `chars` on the keyboard.
    pub fn send_chars(&self, chars: &str) -> Result<()> {
        self.call(MachineRequest::SendChars {
            chars: chars.to_owned(),
            delay: None,
        })
    }

    /// `get_screen_text()`: the screen's text, read by OCR (tesseract).
    pub fn get_screen_text(&self) -> Result<String> {
        self.call(MachineRequest::GetScreenText {})
    }

    /// `wait_for_text(regex)`: waits until the screen's text matches `regex`.
    pub fn wait_for_text(&self, regex: &str) -> Result<()> {
        self.call(MachineRequest::WaitForText {
            regex: regex.to_owned(),
            timeout: self.limit(),
        })
    }

    /// `get_tty_text(tty)`: the text of virtual terminal `tty` (1-12).
    pub fn get_tty_text(&self, tty: u8) -> Result<String> {
        self.call(MachineRequest::GetTtyText {
            tty: Tty::Number(tty.into()),
        })
    }

    /// `wait_until_tty_matches(tty, regexp)`: waits until virtual terminal `tty`'s text
    /// matches `regexp`.
    pub fn wait_until_tty_matches(&self, tty: u8, regexp: &str) -> Result<()> {
        self.call(MachineRequest::WaitUntilTtyMatches {
            tty: Tty::Number(tty.into()),
            regexp: regexp.to_owned(),
            timeout: self.limit(),
        })
    }

    /// `machine.log(message)`: a line in the run's log, attributed to the machine.
    pub fn log(&self, message: &str) {
        self.run.log_as(message, Some(&self.name));
    }

    /// `with machine.nested(message):`: runs `body` in a timed, nested block of the log,
    /// attributed to the machine.
    pub fn nested<T, E: std::fmt::Display>(
        &self,
        message: &str,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.run.block(message, "nested", Some(&self.name), body)
    }
}

fn utf8(path: &Path, call: &str) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Assertion(format!("{call}: {} is not UTF-8", path.display())))
}
