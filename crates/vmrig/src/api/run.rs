//! [`Run`]: a test file's machines, made and held for a Rust test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use vmrig_driver::driver::Driver;
use vmrig_driver::events::{Event, Reporter};
use vmrig_driver::logger::Logger;
use vmrig_driver::request::{Attrs, DriverRequest, Request};
use vmrig_driver::run::{prepare, Prepared};
use vmrig_driver::RunOptions;
use vmrig_image::{BuildObserver, StepOutcome};

use super::error::*;
use super::machine::Machine;

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

impl std::io::Write for TestStderr {
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

impl vmrig_image::BuildObserver for StepLines {
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
    pub(crate) out_dir: PathBuf,
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

    pub(crate) fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T> {
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
        Ok(Machine::new(self, name.to_owned()))
    }

    /// Every machine, in order.
    pub fn machines(&self) -> Vec<Machine<'_>> {
        self.machines
            .iter()
            .map(|name| Machine::new(self, name.clone()))
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

    pub(crate) fn log_as(&self, message: &str, machine: Option<&str>) {
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

    pub(crate) fn block<T, E: std::fmt::Display>(
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
