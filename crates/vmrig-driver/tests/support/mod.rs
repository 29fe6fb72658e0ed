//! A run of the real driver (switches, machines, the Python bridge, the script) on fake
//! machines: `fake_qemu.py` stands in for QEMU and a real bash for the guest's shell, so
//! every decision the driver takes about a machine (boot, reboot, crash, snapshot,
//! timeouts, errors) is tested in milliseconds, without a VM.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmrig_driver::driver::{
    checked_python, run_logger, spec_names, Driver, DriverSetup, MachineSource,
};
use vmrig_driver::events::Event;
use vmrig_driver::machine::NodeQemu;
use vmrig_image::NodeImage;
use vmrig_python::Mode;
use vmrig_spec::{ScriptSource, TestSpec};
use vmrig_store::{Store, StoreKey};
use vmrig_vm::accel::Accel;

/// A test file's machines, made of fakes, in a directory of their own.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub spec: TestSpec,
    pub images: BTreeMap<String, NodeImage>,
    pub store: Store,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// The fake guests' "root" (their working directory, `units/`, `system-state`).
    pub guest: PathBuf,
}

/// How one script run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Why the script failed (`None`: it passed).
    pub failure: Option<String>,
    pub global_timeout: bool,
    pub out_dir: PathBuf,
    /// `events.jsonl`, for what the driver logged.
    pub events: String,
    pub elapsed: Duration,
}

impl Outcome {
    #[track_caller]
    pub fn passed(&self) {
        assert!(
            self.failure.is_none(),
            "the script failed: {:?}\nevents:\n{}",
            self.failure,
            self.events
        );
    }

    #[track_caller]
    pub fn failed_with(&self, needles: &[&str]) -> &str {
        let failure = self
            .failure
            .as_deref()
            .unwrap_or_else(|| panic!("the script passed; events:\n{}", self.events));
        for needle in needles {
            assert!(failure.contains(needle), "{needle:?} not in {failure:?}");
        }
        failure
    }

    pub fn serial_log(&self, machine: &str) -> String {
        std::fs::read_to_string(self.out_dir.join(format!("serial-{machine}.log")))
            .unwrap_or_default()
    }
}

/// Options of one run.
pub struct RunOpts {
    pub snapshots: bool,
    pub global_timeout: u64,
    pub extra: Vec<MachineSourceSpec>,
    /// Save a failure snapshot when the script fails.
    pub failure_snapshot: bool,
    /// Restore the failure snapshot in this output directory before the script.
    pub restore: Option<PathBuf>,
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts {
            snapshots: false,
            global_timeout: 60,
            extra: Vec::new(),
            failure_snapshot: false,
            restore: None,
        }
    }
}

/// A NixOS start command to add to the run's machines.
pub struct MachineSourceSpec {
    pub name: Option<String>,
    pub command: String,
}

const FAKE_QEMU: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fake_qemu.py");

impl Rig {
    /// The machines of `toml` (a test file without its script), booting normally.
    pub fn new(toml: &str) -> Rig {
        Rig::with_fake(toml, &[])
    }

    /// ... with the fake QEMU's `FAKE_QEMU_*` settings (see fake_qemu.py).
    pub fn with_fake(toml: &str, settings: &[(&str, &str)]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let guest = dir.path().join("guest");
        std::fs::create_dir_all(guest.join("units")).unwrap();
        let text = format!("name = \"fake\"\ntest_script = \"pass\"\n{toml}");
        let spec = vmrig_spec::parse(&text, &dir.path().join("fake.toml")).unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let image = fake_image(&store);
        let images = spec
            .nodes
            .keys()
            .map(|name| (name.clone(), image.clone()))
            .collect();
        let mut exports = format!("export FAKE_GUEST='{}'\n", guest.display());
        for (key, value) in settings {
            exports.push_str(&format!("export FAKE_QEMU_{key}='{value}'\n"));
        }
        let qemu = dir.path().join("qemu-system-x86_64");
        write_script(
            &qemu,
            &format!("#!/bin/sh\n{exports}exec python3 {FAKE_QEMU} \"$@\"\n"),
        );
        let qemu_img = dir.path().join("qemu-img");
        write_script(
            &qemu_img,
            "#!/bin/sh\nfor a; do last=$a; done; : > \"$last\"\n",
        );
        Rig {
            dir,
            spec,
            images,
            store,
            qemu,
            qemu_img,
            guest,
        }
    }

    /// Sets a unit's `systemctl show` output in every fake guest.
    pub fn unit(&self, name: &str, properties: &str) {
        std::fs::write(self.guest.join("units").join(name), properties).unwrap();
    }

    pub fn run(&self, script: &str) -> Outcome {
        self.run_with(script, RunOpts::default())
    }

    /// Runs `script` through a new [`Driver`], as `vmrig run` does after its image build.
    pub fn run_with(&self, script: &str, opts: RunOpts) -> Outcome {
        let started = Instant::now();
        let out_dir = tempfile::Builder::new()
            .prefix("out-")
            .tempdir_in(self.dir.path())
            .unwrap()
            .keep();
        let logger = run_logger(
            &out_dir,
            false,
            &[],
            Event::RunStarted {
                test: "fake".into(),
                file: "fake.toml".into(),
            },
        )
        .unwrap();
        let setup = DriverSetup {
            logger,
            out_dir: out_dir.clone(),
            deadline: Instant::now() + Duration::from_secs(opts.global_timeout),
            keep_run_dir: false,
            vlans: Vec::new(),
            capture: false,
            node_qemu: Some(NodeQemu {
                qemu: self.qemu.clone(),
                qemu_img: self.qemu_img.clone(),
                version: "QEMU emulator version 9.2.0 (fake)".into(),
                firmware: None,
            }),
            accel: Accel::Tcg,
            store: self.store.clone(),
            snapshots: opts.snapshots,
            keep_state_in: None,
            start_command_state: (out_dir.clone(), false),
            failure_snapshot: opts.failure_snapshot.then(|| {
                let file = self.dir.path().join("fake.toml");
                std::fs::write(&file, "name = \"fake\"\n").unwrap();
                vmrig_driver::failure::SaveSetup { test_file: file }
            }),
        };
        let mut sources = vec![MachineSource::Nodes {
            spec: &self.spec,
            images: &self.images,
        }];
        for extra in &opts.extra {
            sources.push(MachineSource::StartCommand {
                name: extra.name.clone(),
                command: extra.command.clone(),
            });
        }
        let script = ScriptSource {
            text: script.to_owned(),
            filename: self.dir.path().join("fake.toml"),
            first_line: 1,
            first_column: 1,
        };
        // The script sees the spec's nodes and the extra start commands' machines.
        let mut names = spec_names(&self.spec);
        for extra in &opts.extra {
            let name = extra.name.clone().unwrap_or_else(|| {
                vmrig_driver::creator::machine_name_from_command(&extra.command)
            });
            names.machines.push(vmrig_python::MachineInfo::new(name));
        }
        let python = checked_python(Path::new("python3"), &script, &names).unwrap();
        let (failure, global_timeout) = match Driver::new(setup, &sources) {
            Ok(driver) => {
                if let Some(dir) = &opts.restore {
                    let manifest = vmrig_driver::failure::Manifest::read(dir).unwrap();
                    driver
                        .restore_failure(&manifest, &dir.join(vmrig_driver::failure::DIR_NAME))
                        .unwrap();
                }
                let result = driver
                    .run_script(&python, &script, Mode::Script, opts.global_timeout)
                    .unwrap();
                driver.finish();
                result
            }
            Err(e) => (Some(format!("setting up: {e}")), false),
        };
        Outcome {
            failure,
            global_timeout,
            events: std::fs::read_to_string(out_dir.join("events.jsonl")).unwrap_or_default(),
            out_dir,
            elapsed: started.elapsed(),
        }
    }

    /// A start command that runs the fake QEMU (what a NixOS `run-<name>-vm` script does).
    pub fn start_command(&self, script_name: &str) -> String {
        let path = self.dir.path().join(script_name);
        write_script(
            &path,
            &format!("#!/bin/sh\nexec {} \"$@\"\n", self.qemu.display()),
        );
        path.display().to_string()
    }
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Store paths shaped like a built node image (the fake QEMU reads none of them).
fn fake_image(store: &Store) -> NodeImage {
    let path = |name: &str, file: &str| {
        store
            .build(&StoreKey::new(name, b"fake"), |tmp| {
                std::fs::write(tmp.join(file), b"fake")
            })
            .unwrap()
    };
    NodeImage {
        kernel: path("kernel", "vmlinuz"),
        initramfs: path("initramfs", "initrd"),
        rootfs: path("rootfs", "root.img"),
    }
}
