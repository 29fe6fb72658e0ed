//! One test run: images, networks, machines, the script, the outcome, cleanup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmrig_image::{node_layer, BuildObserver, ImageBuilder};
use vmrig_python::{MachineInfo, Mode, ScriptChild, ScriptContext, ScriptOutcome};
use vmrig_spec::TestSpec;
use vmrig_store::Store;
use vmrig_vm::accel::{self, AccelChoice};
use vmrig_vm::cmdline::VlanNic;

use crate::cleanup::{self, RunDir};
use crate::events::{Event, Reporter};
use crate::logger::Logger;
use crate::machine::{Machine, RunContext};
use crate::reporters::{JsonLines, Terminal};
use crate::rpc::DriverHandler;
use crate::RunError;

/// How to run a test (resolved from the command line).
#[derive(Clone)]
pub struct RunOptions {
    /// Output directory; default `./vmrig-out/<test name>`.
    pub out_dir: Option<PathBuf>,
    pub keep_vm_state: bool,
    pub accel: AccelChoice,
    pub mode: Mode,
    pub python: PathBuf,
    pub qemu: PathBuf,
    /// Extra consumers of the run's events (JUnit, a CLI's progress), besides the terminal
    /// log and `events.jsonl`.
    pub reporters: Vec<Arc<dyn Reporter>>,
    /// Show the NixOS-style log on stderr (off when many tests run at once).
    pub terminal_log: bool,
    /// Write one pcap file per VLAN (`vlan<N>.pcap`) into the output directory.
    pub capture: bool,
    /// Boot from saved snapshots and save new ones (nodes may opt out with `snapshot = false`).
    pub snapshots: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out_dir: None,
            keep_vm_state: false,
            accel: AccelChoice::Auto,
            mode: Mode::Script,
            python: "python3".into(),
            qemu: "qemu-system-x86_64".into(),
            reporters: Vec::new(),
            terminal_log: true,
            capture: false,
            snapshots: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub passed: bool,
    pub elapsed: Duration,
    /// One line saying why it failed.
    pub failure: Option<String>,
    pub out_dir: PathBuf,
    /// The images the machines booted, by node (for the result cache).
    pub images: BTreeMap<String, vmrig_image::NodeImage>,
}

pub use vmrig_vm::process::find_program;

/// The firmware to boot with: qboot when QEMU ships it (about 1.7 s faster than SeaBIOS).
pub fn firmware() -> Option<PathBuf> {
    ["/usr/share/qemu/qboot.rom", "/usr/share/qboot/bios.bin"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs `spec`: checks the script, builds images (progress to `observer`), boots, runs.
pub fn run_test(
    spec: &TestSpec,
    opts: &RunOptions,
    observer: &dyn BuildObserver,
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    cleanup::install_signal_handlers();
    let python = find_program(&opts.python).ok_or_else(|| {
        RunError::Python(vmrig_python::BridgeError::PythonNotFound {
            python: opts.python.clone(),
        })
    })?;
    vmrig_python::check_syntax(&python, &spec.script).map_err(RunError::Script)?;
    let qemu = find_program(&opts.qemu).ok_or_else(|| {
        RunError::Infra(format!(
            "`{}` not found: install QEMU (`sudo apt-get install qemu-system-x86 qemu-utils`) \
             or name another with `--qemu PATH` (or VMRIG_QEMU)",
            opts.qemu.display()
        ))
    })?;
    let qemu_img = find_program(Path::new("qemu-img")).ok_or_else(|| {
        RunError::Infra(
            "`qemu-img` not found; install it with `sudo apt-get install qemu-utils`".into(),
        )
    })?;
    let qemu_version = check_qemu_version(&qemu)?;
    let decision = accel::decide(opts.accel).map_err(|e| RunError::Infra(e.to_string()))?;

    let store =
        Store::open_default().map_err(|e| RunError::Infra(format!("opening the store: {e}")))?;
    let builder = ImageBuilder::new(&store, observer);
    builder.check_tools().map_err(RunError::Image)?;
    let (images, guards) = build_and_hold(&store, &builder, spec)?;

    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("vmrig-out").join(&spec.name));
    std::fs::create_dir_all(&out_dir).map_err(|e| {
        RunError::Infra(format!(
            "cannot create the output directory {}: {e}; choose another with `-o DIR`",
            out_dir.display()
        ))
    })?;
    let logger = run_logger(
        &out_dir,
        opts.terminal_log,
        &opts.reporters,
        Event::RunStarted {
            test: spec.name.clone(),
            file: spec.path.display().to_string(),
        },
    )?;
    logger.emit(Event::Info {
        message: format!("accelerator: {} ({})", decision.accel, decision.reason),
    });

    let run_dir = RunDir::create(opts.keep_vm_state)
        .map_err(|e| RunError::Infra(format!("creating a run directory: {e}")))?;
    if opts.keep_vm_state {
        logger.emit(Event::Info {
            message: format!("keeping VM state in {}", run_dir.path().display()),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(spec.global_timeout);
    let serial_stdout = Arc::new(AtomicBool::new(true));
    let ctx = Arc::new(RunContext {
        qemu,
        qemu_img,
        accel: decision.accel,
        firmware: firmware(),
        logger: logger.clone(),
        out_dir: out_dir.clone(),
        run_dir: run_dir.path().to_owned(),
        serial_stdout: serial_stdout.clone(),
        deadline,
        store: store.clone(),
        snapshots: opts.snapshots,
        qemu_version,
        keep_state_in: opts.keep_vm_state.then(|| out_dir.clone()),
    });

    let mut vlans = BTreeMap::new();
    for node in spec.nodes.values() {
        for &nr in &node.vlans {
            if let std::collections::btree_map::Entry::Vacant(e) = vlans.entry(nr) {
                let vlan = vmrig_net::Vlan::start(nr, run_dir.path()).map_err(|e| {
                    RunError::Infra(format!("starting the switch of VLAN {nr}: {e}"))
                })?;
                if opts.capture {
                    let pcap = out_dir.join(format!("vlan{nr}.pcap"));
                    vlan.capture(&pcap).map_err(|e| {
                        RunError::Infra(format!("capturing VLAN {nr} to {}: {e}", pcap.display()))
                    })?;
                    logger.emit(Event::Info {
                        message: format!("capturing VLAN {nr} to {}", pcap.display()),
                    });
                }
                e.insert(Arc::new(vlan));
            }
        }
    }
    let mut machines = BTreeMap::new();
    for (name, node) in &spec.nodes {
        let addresses = node_layer::vlan_addresses(spec, node);
        let mut nics = Vec::new();
        for a in &addresses {
            let socket = vlans[&a.vlan]
                .add_port(name)
                .map_err(|e| RunError::Infra(format!("adding `{name}` to VLAN {}: {e}", a.vlan)))?;
            nics.push(VlanNic {
                vlan: a.vlan,
                mac: a.mac.clone(),
                socket,
            });
        }
        let layer = node_layer::node_layer(spec, node)
            .map_err(|e| RunError::Infra(format!("node `{name}`: {e}")))?;
        let machine = Machine::new(ctx.clone(), node.clone(), images[name].clone(), layer, nics);
        machines.insert(name.clone(), Arc::new(Mutex::new(machine)));
    }
    let creator = crate::nixos::MachineCreator::new(ctx.clone(), out_dir.clone(), &vlans, false);
    let handler = DriverHandler {
        machines: std::sync::RwLock::new(machines),
        vlans,
        logger: logger.clone(),
        serial_stdout,
        creator,
    };

    let script_ctx = ScriptContext {
        machines: spec
            .nodes
            .keys()
            .map(|n| MachineInfo::new(n.clone()))
            .collect(),
        vlans: handler.vlans.keys().copied().collect(),
        out_dir: out_dir.clone(),
        work_dir: run_dir.path().to_owned(),
    };
    let (failure, _) = serve_script(
        &handler,
        &python,
        &spec.script,
        &script_ctx,
        opts.mode,
        (deadline, spec.global_timeout),
    )?;
    // Machines die here (QEMU killed), then the switches, then the run directory.
    drop(handler);
    drop(run_dir);
    drop(guards);
    let elapsed = started.elapsed();
    let passed = failure.is_none();
    let summary = match &failure {
        None => format!(
            "test {} passed in {:.1} s",
            spec.name,
            elapsed.as_secs_f64()
        ),
        Some(why) => format!(
            "test {} FAILED after {:.1} s: {why}",
            spec.name,
            elapsed.as_secs_f64()
        ),
    };
    logger.emit(Event::RunFinished {
        passed,
        elapsed,
        summary,
    });
    Ok(RunOutcome {
        passed,
        elapsed,
        failure,
        out_dir,
        images,
    })
}

/// Runs the test script against `handler` until it ends or the global timeout
/// `(deadline, seconds)` passes: why it failed (also logged; `None` if it passed), and
/// whether the global timeout ended it.
pub(crate) fn serve_script(
    handler: &DriverHandler,
    python: &Path,
    script: &vmrig_spec::ScriptSource,
    script_ctx: &ScriptContext,
    mode: Mode,
    (deadline, global_timeout): (Instant, u64),
) -> Result<(Option<String>, bool), RunError> {
    let logger = &handler.logger;
    if mode == Mode::Interactive {
        cleanup::ignore_sigint(true);
    }
    let child = ScriptChild::spawn(python, script, script_ctx, mode).map_err(RunError::Python)?;
    let killer = child.killer();
    let script_id = cleanup::register_script(killer.clone());
    let (stop_watchdog, watchdog) =
        global_timeout_watchdog(deadline, killer, logger.clone(), global_timeout);
    let served = child.serve(handler);
    let _ = stop_watchdog.send(());
    let fired = watchdog.join().unwrap_or(false);
    cleanup::unregister_script(script_id);
    cleanup::ignore_sigint(false);

    let outcome = served.map_err(RunError::Python)?;
    let timed_out = global_timeout_ended(fired, &outcome, deadline, Instant::now());
    let failure = match outcome {
        ScriptOutcome::Passed => None,
        _ if timed_out => Some(format!("global timeout of {} s reached", global_timeout)),
        ScriptOutcome::Failed {
            exc_type,
            message,
            line,
            traceback,
        } => {
            let file = script.filename.display().to_string();
            let first = message.lines().next().unwrap_or_default().to_owned();
            let place = line.map(|l| format!("{file}:{l}: ")).unwrap_or_default();
            logger.emit(Event::ScriptFailed {
                exc_type: exc_type.clone(),
                message,
                line,
                file,
                traceback,
            });
            Some(format!("{place}{exc_type}: {first}"))
        }
        ScriptOutcome::Killed => Some("the test script was killed".into()),
        ScriptOutcome::ExitedWithoutReport(code) => Some(format!(
            "the test script exited with status {code} without reporting"
        )),
    };
    Ok((failure, timed_out))
}

/// The run's log: `events.jsonl` in `out_dir`, the terminal (if `terminal`), the caller's
/// reporters; `started` is its first event.
pub(crate) fn run_logger(
    out_dir: &Path,
    terminal: bool,
    extra: &[Arc<dyn Reporter>],
    started: Event,
) -> Result<Logger, RunError> {
    let events = JsonLines::create(&out_dir.join("events.jsonl")).map_err(|e| {
        RunError::Infra(format!(
            "cannot write to the output directory {}: {e}; choose another with `-o DIR`",
            out_dir.display()
        ))
    })?;
    let mut reporters: Vec<Box<dyn Reporter>> = vec![Box::new(events)];
    if terminal {
        reporters.push(Box::new(Terminal::stderr()));
    }
    for reporter in extra {
        reporters.push(Box::new(Shared(reporter.clone())));
    }
    let logger = Logger::new(reporters);
    logger.emit(started);
    Ok(logger)
}

/// Builds (or finds) the test's images and marks every store path in use. A `store gc`
/// may remove a path between the build and the guard: then build again (bounded).
fn build_and_hold(
    store: &Store,
    builder: &ImageBuilder,
    spec: &TestSpec,
) -> Result<
    (
        BTreeMap<String, vmrig_image::NodeImage>,
        Vec<vmrig_store::UseGuard>,
    ),
    RunError,
> {
    let mut attempt = 0;
    'build: loop {
        attempt += 1;
        let images = builder.build_test(spec).map_err(RunError::Image)?;
        let mut guards = Vec::new();
        for image in images.values() {
            for path in image.store_paths() {
                match store.use_path(path) {
                    Ok(guard) => guards.push(guard),
                    Err(vmrig_store::StoreError::Gone { .. }) if attempt < 5 => continue 'build,
                    Err(e) => return Err(RunError::Infra(e.to_string())),
                }
            }
        }
        return Ok((images, guards));
    }
}

/// The oldest QEMU vmrig works with: `-netdev stream` (the switch) arrived in 7.2.
pub const MIN_QEMU: (u32, u32) = (7, 2);

/// Parses `QEMU emulator version 7.2.22 (...)`.
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn check_qemu_version(qemu: &Path) -> Result<String, RunError> {
    let text = crate::snapshot::qemu_version_line(qemu).map_err(|e| {
        RunError::Infra(format!(
            "cannot run `{} --version`: {e}; name an executable QEMU with `--qemu PATH` (or VMRIG_QEMU)",
            qemu.display()
        ))
    })?;
    match parse_qemu_version(&text) {
        Some(v) if v >= MIN_QEMU => Ok(text),
        Some((major, minor)) => Err(RunError::Infra(format!(
            "{} is QEMU {major}.{minor}, too old: vmrig needs QEMU {}.{} or newer (for `-netdev stream`): install a newer qemu-system-x86 or name another with `--qemu PATH` (or VMRIG_QEMU)",
            qemu.display(), MIN_QEMU.0, MIN_QEMU.1
        ))),
        None => Err(RunError::Infra(format!(
            "`{} --version` did not print a QEMU version (it printed {:?}): name the QEMU system emulator with `--qemu PATH` (or VMRIG_QEMU)",
            qemu.display(),
            text.trim()
        ))),
    }
}

/// Kills the script and every VM when the global timeout passes. Returns a sender that
/// stops the watchdog, and its handle (true if it fired).
fn global_timeout_watchdog(
    deadline: Instant,
    killer: vmrig_python::ScriptKiller,
    logger: Logger,
    secs: u64,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<bool>) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                logger.log(
                    crate::events::Level::Error,
                    format!("global timeout of {secs} s reached: stopping the test"),
                    None,
                );
                // Only this run's script: every wait of its machines is bounded by the
                // same deadline, so the call in progress returns now too (other tests
                // running in this process are left alone).
                killer.kill();
                true
            }
            _ => false,
        }
    });
    (tx, handle)
}

/// How long before the global deadline a call's own wait may give up: a polling wait
/// (`wait_for_unit`, `wait_until_succeeds`) does not start a pause of up to a second that
/// would end past its deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(1500);

/// Whether the global timeout ended the script: the watchdog fired, or the script failed
/// when the deadline had passed or was at most [`DEADLINE_SLACK`] away. Every wait of a
/// call is bounded by the same deadline, so a call in progress (`wait_for_unit`, a
/// command) returns its own timeout error before the watchdog wakes, and the script fails
/// of the global timeout all the same (upstream exits 143 there too).
fn global_timeout_ended(
    fired: bool,
    outcome: &ScriptOutcome,
    deadline: Instant,
    now: Instant,
) -> bool {
    fired || (!matches!(outcome, ScriptOutcome::Passed) && now + DEADLINE_SLACK >= deadline)
}

/// A reporter shared with the caller (who reads what it collected after the run).
struct Shared(Arc<dyn Reporter>);

impl Reporter for Shared {
    fn report(&self, event: &crate::events::Stamped) {
        self.0.report(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("garbage"), None);
        assert!((6, 2) < MIN_QEMU && (10, 0) >= MIN_QEMU);
    }

    #[test]
    fn a_failure_after_the_deadline_is_the_global_timeout() {
        let deadline = Instant::now();
        let failed = ScriptOutcome::Failed {
            exc_type: "RequestedAssertionFailed".into(),
            message: "timed out".into(),
            line: Some(3),
            traceback: String::new(),
        };
        let after = deadline + Duration::from_millis(1);
        assert!(global_timeout_ended(false, &failed, deadline, after));
        // A poll that gave up a second early (its next pause would end past the deadline).
        let poll_gave_up = deadline - Duration::from_millis(900);
        assert!(global_timeout_ended(false, &failed, deadline, poll_gave_up));
        let before = deadline - Duration::from_secs(3);
        assert!(!global_timeout_ended(false, &failed, deadline, before));
        assert!(!global_timeout_ended(
            false,
            &ScriptOutcome::Passed,
            deadline,
            after
        ));
        assert!(global_timeout_ended(
            true,
            &ScriptOutcome::Killed,
            deadline,
            before
        ));
    }
}
