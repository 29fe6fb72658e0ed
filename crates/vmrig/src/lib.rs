//! Drive vmrig's virtual machines from Rust tests (`cargo test`).
//!
//! A test file declares the machines (the same TOML as `vmrig run` takes; its
//! `test_script` may be left out), and the Rust test drives them with the NixOS test
//! driver's API under Rust names: [`Run`] is upstream's driver (`start_all`, `subtest`,
//! `partition`, ...), [`Machine`] a machine (`succeed`, `fail`, `execute`,
//! `wait_for_unit`, `copy_from_host`, ...). Every call goes through the same driver and
//! the same request handler as a Python test script's calls, so a call means what it means
//! there; results are Rust types and errors are [`Error`]s, one variant per kind of
//! failure.
//!
//! ```no_run
//! # fn main() -> Result<(), vmrig::Error> {
//! // Builds the images (cached in the store) and makes the machines; none boots yet.
//! let run = vmrig::Run::from_file("tests/web.toml")?;
//! run.start_all()?;
//! let server = run.machine("server")?;
//! server.wait_for_unit("nginx.service")?;
//! server.wait_for_open_port(80)?;
//! let page = run.machine("client")?.succeed("curl -s http://server/")?;
//! assert!(page.contains("Welcome to nginx!"));
//! // A failed check is an `Error::Assertion`, as upstream's `RequestedAssertionFailed`.
//! assert!(matches!(server.succeed("false"), Err(vmrig::Error::Assertion(_))));
//! # Ok(())
//! # }
//! // Dropping `run` stops every VM, the switches, and removes the run directory.
//! ```
//!
//! # Cleanup
//!
//! Dropping a [`Run`] kills its QEMU processes, stops its switches and removes its run
//! directory, also when the test panics (the drop runs while the panic unwinds). When the
//! test process dies without unwinding (SIGKILL, `panic = "abort"`), QEMU dies with it
//! (`PR_SET_PDEATHSIG`) and a watcher process removes the run directory; SIGINT and
//! SIGTERM stop every VM of the process before it exits.
//!
//! # Timeouts
//!
//! As upstream: commands have no time limit of their own (but [`Machine::execute`]: 900 s)
//! and waits give up after 900 s; [`Machine::with_timeout`] sets another limit. Every wait
//! also ends at the test file's `global_timeout` (default 3600 s, counted from when the
//! [`Run`] is ready, after the image builds): past it, calls fail.
//!
//! # Output
//!
//! The run writes `events.jsonl` and the machines' serial logs into its output directory
//! (default `vmrig-out/<test name>`, relative to the working directory, which `cargo test`
//! sets to the package's directory; see [`RunBuilder::out_dir`]). The NixOS-style log goes
//! to the test's stderr through `eprint!`, so the test harness shows it for failed tests.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmrig_driver::driver::Driver;
use vmrig_driver::events::{Event, Reporter};
use vmrig_driver::logger::Logger;
use vmrig_driver::request::{Attrs, DriverRequest, MachineRequest, Request, Tty};
use vmrig_driver::run::{prepare, Prepared};
use vmrig_driver::RunOptions;
use vmrig_image::{BuildObserver, StepOutcome};
use vmrig_python::{RpcError, RpcErrorKind};

pub use vmrig_driver::RunError;
pub use vmrig_image::ImageError;
pub use vmrig_spec::SpecError;

/// A `Result` whose error is vmrig's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call failed. Match on the variant to tell a failed check from a broken host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The test file cannot be read or is not valid (the message names file, line and
    /// column).
    #[error(transparent)]
    TestFile(Box<SpecError>),
    /// A guest image could not be built: a missing host tool, an unknown package, a
    /// builder that failed.
    #[error(transparent)]
    Build(Box<ImageError>),
    /// A check did not hold: `succeed`'s command failed, `fail`'s succeeded, a unit failed
    /// (upstream's `RequestedAssertionFailed`).
    #[error("{0}")]
    Assertion(String),
    /// The machine cannot do that: it is not running, has no display, its shell is gone
    /// (upstream's `MachineError`).
    #[error("{0}")]
    Machine(String),
    /// A wait ran out of time (its own timeout or the test's `global_timeout`).
    #[error("{0}")]
    Timeout(String),
    /// [`Run::machine`] was given a name that is no machine of the test.
    #[error("no machine named `{name}` in this test; it has: {}", known.join(", "))]
    NoSuchMachine {
        /// The name asked for.
        name: String,
        /// The test's machines.
        known: Vec<String>,
    },
    /// The host could not run the test: QEMU, the store, the output directory, the
    /// switches. The [`RunError`] names what failed (a variant each), and its
    /// [`kind`](RunError::kind) tells a full disk from the rest.
    #[error(transparent)]
    Infra(Box<RunError>),
    /// A bug in vmrig (a request it did not serve, an answer that does not parse).
    #[error("vmrig internal error: {0}")]
    Internal(String),
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Error {
        match e {
            RunError::Image(e) => Error::Build(Box::new(e)),
            other => Error::Infra(Box::new(other)),
        }
    }
}

fn call_error(e: RpcError) -> Error {
    match e.kind {
        RpcErrorKind::RequestedAssertionFailed => Error::Assertion(e.message),
        RpcErrorKind::MachineError => Error::Machine(e.message),
        RpcErrorKind::Timeout => Error::Timeout(e.message),
        RpcErrorKind::Internal => Error::Internal(e.message),
    }
}

fn answer<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::Internal(format!("unexpected answer {value}: {e}")))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The accelerator the VMs run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` can really boot a standard guest, else TCG (the default).
    #[default]
    Auto,
    /// KVM, or an error.
    Kvm,
    /// TCG (software emulation; slower, runs anywhere).
    Tcg,
}

/// Options of a [`Run`]; made by [`Run::builder`], ended by [`RunBuilder::build`].
#[derive(Clone)]
pub struct RunBuilder {
    file: PathBuf,
    options: RunOptions,
    terminal_log: bool,
}

impl RunBuilder {
    /// Where the run writes `events.jsonl`, the serial logs, screenshots and copied files
    /// (made if missing). Default: `vmrig-out/<test name>`. Two runs at once need two
    /// directories; `concat!(env!("CARGO_TARGET_TMPDIR"), "/web")` keeps them out of the
    /// source tree.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> RunBuilder {
        self.options.out_dir = Some(dir.into());
        self
    }

    /// Boot from saved boot snapshots and save new ones (default: on; nodes may opt out
    /// with `snapshot = false`).
    pub fn snapshots(mut self, on: bool) -> RunBuilder {
        self.options.snapshots = on;
        self
    }

    /// The accelerator (default [`Accel::Auto`]).
    pub fn accel(mut self, accel: Accel) -> RunBuilder {
        self.options.accel = match accel {
            Accel::Auto => vmrig_vm::accel::AccelChoice::Auto,
            Accel::Kvm => vmrig_vm::accel::AccelChoice::Kvm,
            Accel::Tcg => vmrig_vm::accel::AccelChoice::Tcg,
        };
        self
    }

    /// The QEMU system emulator (default: `VMRIG_QEMU`, else `qemu-system-x86_64` on
    /// `PATH`).
    pub fn qemu(mut self, program: impl Into<PathBuf>) -> RunBuilder {
        self.options.qemu = program.into();
        self
    }

    /// Write one pcap file per VLAN (`vlan<N>.pcap`) into the output directory.
    pub fn capture(mut self, on: bool) -> RunBuilder {
        self.options.capture = on;
        self
    }

    /// Show the NixOS-style log and the image builds' progress on the test's stderr
    /// (default: on).
    pub fn terminal_log(mut self, on: bool) -> RunBuilder {
        self.terminal_log = on;
        self
    }

    /// Reads the test file, builds (or finds) its images and makes its machines: none is
    /// started yet (a machine starts on [`Run::start_all`], [`Machine::start`] or its
    /// first command, as upstream).
    pub fn build(self) -> Result<Run> {
        let started = Instant::now();
        let spec =
            vmrig_spec::load_machines(&self.file).map_err(|e| Error::TestFile(Box::new(e)))?;
        let mut options = self.options;
        options.terminal_log = false;
        if self.terminal_log {
            let log: Arc<dyn Reporter> = Arc::new(vmrig_driver::reporters::Terminal::to_writer(
                Box::new(TestStderr),
            ));
            options.reporters.push(log);
        }
        let observer: &dyn BuildObserver = if self.terminal_log {
            &StepLines
        } else {
            &vmrig_image::Quiet
        };
        let Prepared {
            driver,
            logger,
            out_dir,
            images: _,
            guards,
        } = prepare(&spec, &options, observer)?;
        Ok(Run {
            driver: Some(driver),
            guards,
            logger,
            out_dir,
            name: spec.name,
            machines: spec.nodes.into_keys().collect(),
            started,
        })
    }
}

/// Writes through `eprint!`, which the test harness captures (and shows for a failed test).
struct TestStderr;

impl Write for TestStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Image build progress as plain lines on the test's stderr.
struct StepLines;

impl BuildObserver for StepLines {
    fn step_started(&self, step: &str) {
        eprintln!("building {step}...");
    }

    fn step_finished(&self, step: &str, outcome: StepOutcome) {
        match outcome {
            StepOutcome::Built(took) => eprintln!("built {step} in {:.1}s", took.as_secs_f64()),
            StepOutcome::Cached => eprintln!("cached: {step}"),
            StepOutcome::Fetched(took) => {
                eprintln!(
                    "fetched {step} from the cache in {:.1}s",
                    took.as_secs_f64()
                )
            }
        }
    }
}

/// A test's machines and networks: upstream's driver, for Rust.
///
/// Made by [`Run::from_file`] or [`Run::builder`]. Dropping it stops everything (see the
/// [crate documentation](crate#cleanup)). A `Run` is `Sync`: [`Machine`] handles may be
/// used from several threads at once (each machine serves one call at a time).
pub struct Run {
    /// `None` once finished (in `drop`).
    driver: Option<Driver>,
    /// The images' store paths in use; released after the driver.
    guards: Vec<vmrig_store::UseGuard>,
    logger: Logger,
    out_dir: PathBuf,
    name: String,
    machines: Vec<String>,
    started: Instant,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("name", &self.name)
            .field("machines", &self.machines)
            .field("out_dir", &self.out_dir)
            .finish_non_exhaustive()
    }
}

impl Run {
    /// The test file `file`'s machines, with the default options: [`Run::builder`]`(file)`
    /// `.build()`.
    ///
    /// ```no_run
    /// let run = vmrig::Run::from_file("tests/web.toml")?;
    /// run.machine("server")?.wait_for_unit("nginx.service")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn from_file(file: impl AsRef<Path>) -> Result<Run> {
        Run::builder(file).build()
    }

    /// Options for a run of the test file `file`.
    ///
    /// ```no_run
    /// let run = vmrig::Run::builder("tests/web.toml")
    ///     .out_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/target/web"))
    ///     .snapshots(false)
    ///     .build()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn builder(file: impl AsRef<Path>) -> RunBuilder {
        let mut options = RunOptions::default();
        if let Some(qemu) = std::env::var_os("VMRIG_QEMU") {
            options.qemu = qemu.into();
        }
        RunBuilder {
            file: file.as_ref().to_owned(),
            options,
            terminal_log: true,
        }
    }

    fn driver(&self) -> &Driver {
        self.driver.as_ref().expect("a run serves until dropped")
    }

    fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T> {
        answer(self.driver().call(request).map_err(call_error)?)
    }

    fn driver_call<T: DeserializeOwned>(&self, call: DriverRequest) -> Result<T> {
        self.call(Request::Driver(call))
    }

    /// The test's `name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output directory (`events.jsonl`, serial logs, screenshots, copied files).
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// The names of the test's machines, in order.
    pub fn machine_names(&self) -> &[String] {
        &self.machines
    }

    /// The machine `name` (a node of the test file), or [`Error::NoSuchMachine`].
    pub fn machine(&self, name: &str) -> Result<Machine<'_>> {
        if !self.machines.iter().any(|m| m == name) {
            return Err(Error::NoSuchMachine {
                name: name.to_owned(),
                known: self.machines.clone(),
            });
        }
        Ok(Machine {
            run: self,
            name: name.to_owned(),
            timeout: None,
            user: None,
        })
    }

    /// Every machine, in order.
    pub fn machines(&self) -> Vec<Machine<'_>> {
        self.machines
            .iter()
            .map(|name| Machine {
                run: self,
                name: name.clone(),
                timeout: None,
                user: None,
            })
            .collect()
    }

    /// `start_all()`: starts every machine (without waiting for them to boot).
    pub fn start_all(&self) -> Result<()> {
        self.driver_call(DriverRequest::StartAll {})
    }

    /// `join_all()`: waits until every machine has shut down.
    pub fn join_all(&self) -> Result<()> {
        self.driver_call(DriverRequest::JoinAll {})
    }

    /// `log.info(message)`: a line in the run's log.
    pub fn log(&self, message: &str) {
        self.log_as(message, None);
    }

    fn log_as(&self, message: &str, machine: Option<&str>) {
        let _: Result<()> = self.driver_call(DriverRequest::LogMessage {
            level: None,
            message: message.to_owned(),
            attrs: attrs(machine),
        });
    }

    /// `with subtest(name):`: runs `body` in a subtest block of the log (and of
    /// `events.jsonl`), which records its error if it fails.
    ///
    /// ```no_run
    /// # let run = vmrig::Run::from_file("tests/web.toml")?;
    /// run.subtest("the page is served", || {
    ///     run.machine("server")?.wait_for_open_port(80)?;
    ///     run.machine("client")?.succeed("curl -sf http://server/")
    /// })?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn subtest<T, E: std::fmt::Display>(
        &self,
        name: &str,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.block(name, "subtest", None, body)
    }

    /// `with log.nested(message):`: runs `body` in a timed, nested block of the log.
    pub fn nested<T, E: std::fmt::Display>(
        &self,
        message: &str,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.block(message, "nested", None, body)
    }

    fn block<T, E: std::fmt::Display>(
        &self,
        message: &str,
        kind: &str,
        machine: Option<&str>,
        body: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        #[derive(serde::Deserialize)]
        struct Begun {
            id: u64,
        }
        let begun: Result<Begun> = self.driver_call(DriverRequest::BlockBegin {
            message: message.to_owned(),
            kind: Some(kind.to_owned()),
            attrs: attrs(machine),
        });
        let Ok(Begun { id }) = begun else {
            return body();
        };
        // Ends the block when `body` panics, too.
        struct End<'r> {
            run: &'r Run,
            id: u64,
            error: Option<String>,
        }
        impl Drop for End<'_> {
            fn drop(&mut self) {
                let error = self
                    .error
                    .take()
                    .or_else(|| std::thread::panicking().then(|| "the test panicked".to_owned()));
                let _: Result<()> = self
                    .run
                    .driver_call(DriverRequest::BlockEnd { id: self.id, error });
            }
        }
        let mut end = End {
            run: self,
            id,
            error: None,
        };
        let result = body();
        end.error = result.as_ref().err().map(ToString::to_string);
        drop(end);
        result
    }

    /// `partition(group_a, group_b)`: frames between a machine of `group_a` and one of
    /// `group_b` are dropped on every VLAN, until [`Run::heal`].
    pub fn partition(&self, group_a: &[&str], group_b: &[&str]) -> Result<()> {
        let names = |g: &[&str]| g.iter().map(|s| s.to_string()).collect();
        self.driver_call(DriverRequest::Partition {
            group_a: names(group_a),
            group_b: names(group_b),
        })
    }

    /// `heal()`: ends every partition.
    pub fn heal(&self) -> Result<()> {
        self.driver_call(DriverRequest::Heal {})
    }

    /// `vlans[vlan].set_loss(percent)`: drops this share of the frames on VLAN `vlan`.
    pub fn set_loss(&self, vlan: u8, percent: f64) -> Result<()> {
        self.driver_call(DriverRequest::SetLoss {
            vlan: vlan.into(),
            percent: Some(percent),
        })
    }

    /// `vlans[vlan].set_delay(ms)`: delays every frame on VLAN `vlan`.
    pub fn set_delay(&self, vlan: u8, delay: Duration) -> Result<()> {
        self.driver_call(DriverRequest::SetDelay {
            vlan: vlan.into(),
            ms: Some(secs(delay) * 1000.0),
        })
    }
}

fn attrs(machine: Option<&str>) -> Attrs {
    Attrs {
        machine: machine.map(str::to_owned),
        other: Default::default(),
    }
}

impl Drop for Run {
    /// Stops the machines (QEMU killed), the switches, removes the run directory, then
    /// releases the images and ends the log.
    fn drop(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.finish();
        }
        self.guards.clear();
        let elapsed = self.started.elapsed();
        let panicked = std::thread::panicking();
        let summary = if panicked {
            format!(
                "test {} FAILED after {:.1} s: the Rust test panicked",
                self.name,
                elapsed.as_secs_f64()
            )
        } else {
            format!(
                "test {} ended after {:.1} s",
                self.name,
                elapsed.as_secs_f64()
            )
        };
        self.logger.emit(Event::RunFinished {
            passed: !panicked,
            elapsed,
            summary,
        });
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_shared_by_threads_and_errors_cross_them() {
        fn sync<T: Sync>() {}
        fn send_sync_static<T: Send + Sync + 'static>() {}
        sync::<Run>();
        sync::<Machine<'static>>();
        send_sync_static::<Error>();
    }

    #[test]
    fn call_errors_keep_their_kind() {
        assert!(matches!(
            call_error(RpcError::assertion("no")),
            Error::Assertion(m) if m == "no"
        ));
        assert!(matches!(
            call_error(RpcError::machine("gone")),
            Error::Machine(_)
        ));
        assert!(matches!(
            call_error(RpcError::timeout("late")),
            Error::Timeout(_)
        ));
        assert!(matches!(
            call_error(RpcError::internal("bug")),
            Error::Internal(_)
        ));
    }

    #[test]
    fn answers_parse_into_rust_types() {
        let (status, out): (i32, String) = answer(serde_json::json!([3, "x\n"])).unwrap();
        assert_eq!((status, out.as_str()), (3, "x\n"));
        let () = answer(Value::Null).unwrap();
        let info: BTreeMap<String, String> =
            answer(serde_json::json!({"ActiveState": "active"})).unwrap();
        assert_eq!(info["ActiveState"], "active");
        assert!(matches!(
            answer::<String>(serde_json::json!(1)),
            Err(Error::Internal(_))
        ));
    }

    #[test]
    fn a_missing_test_file_is_a_test_file_error() {
        let err = Run::from_file("/nonexistent/web.toml").unwrap_err();
        assert!(matches!(err, Error::TestFile(_)), "{err:?}");
        assert!(err.to_string().contains("cannot read test file"), "{err}");
    }
}
