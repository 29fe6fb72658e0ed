//! `vmrig nixos-driver` (and vmrig invoked as `nixos-test-driver`): the upstream NixOS test
//! driver's command line in all its recent forms, on vmrig's driver.
//!
//! Forms: `--start-scripts S...` (older; machine names from `run-<name>-vm`),
//! `--vm-names N... --vm-start-scripts S...` (newer), and `--config FILE.json` (newest:
//! `vms`, `vlans`, `global_timeout`, `test_script`). Every list and value may come from the
//! environment as upstream reads it (`startScripts`, `vmNames`, `vmStartScripts`, `vlans`,
//! `testScript`, `globalTimeout`; lists split on whitespace). Flags win over the
//! environment; `--config` fills what neither gave.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use vmrig_driver::nixos::NixosRun;

use crate::exit;

/// Upstream's default when neither flag nor environment sets it is a week; a forgotten
/// hang should not block a machine that long.
const DEFAULT_GLOBAL_TIMEOUT: u64 = 3600;

#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "nixos-test-driver",
    about = "Run a NixOS VM test (start scripts + Python test script) on vmrig's driver",
    long_about = "Run a NixOS VM test on vmrig's driver: the upstream nixos-test-driver's command \
        line (--start-scripts, --vm-names/--vm-start-scripts, --config FILE.json, and the \
        environment variables startScripts, vmNames, vmStartScripts, vlans, testScript, \
        globalTimeout). VLANs are vmrig switches reached through QEMU_VDE_SOCKET_<n>."
)]
pub struct NixosArgs {
    /// Re-use the machines' state (vm-state-<name> in $TMPDIR) from a previous run.
    #[arg(
        short = 'K',
        long = "keep-vm-state",
        visible_alias = "keep-machine-state"
    )]
    pub keep_vm_state: bool,
    /// Drop into a Python REPL with the machines instead of running the script.
    #[arg(short = 'I', long, overrides_with = "no_interactive")]
    pub interactive: bool,
    #[arg(long, hide = true)]
    pub no_interactive: bool,
    /// Start scripts of the machines (names from `run-<name>-vm`). Env: startScripts.
    #[arg(long, num_args = 0.., value_name = "START-SCRIPT")]
    pub start_scripts: Option<Vec<String>>,
    /// Names of the machines, in the order of --vm-start-scripts. Env: vmNames.
    #[arg(long, num_args = 0.., value_name = "VM-NAME")]
    pub vm_names: Option<Vec<String>>,
    /// Start scripts of the machines named by --vm-names. Env: vmStartScripts.
    #[arg(long, num_args = 0.., value_name = "VM-START-SCRIPT")]
    pub vm_start_scripts: Option<Vec<String>>,
    /// Containers (systemd-nspawn) are not supported by vmrig; only empty lists are accepted.
    #[arg(long, num_args = 0.., hide = true)]
    pub container_names: Option<Vec<String>>,
    #[arg(long, num_args = 0.., hide = true)]
    pub container_start_scripts: Option<Vec<String>>,
    /// VLAN numbers to span. Env: vlans.
    #[arg(long, num_args = 0.., value_name = "VLAN")]
    pub vlans: Option<Vec<String>>,
    /// Timeout in seconds for the whole test (exit status 143 when reached). Env: globalTimeout.
    #[arg(long, value_name = "SECONDS")]
    pub global_timeout: Option<u64>,
    /// Directory for outputs (screenshots, copied files, logs); must exist.
    #[arg(
        short = 'o',
        long = "output_directory",
        visible_alias = "output-directory"
    )]
    pub output_directory: Option<PathBuf>,
    /// Write a JUnit XML report to this path (relative to the output directory).
    #[arg(long)]
    pub junit_xml: Option<PathBuf>,
    /// The driver configuration as JSON (newest upstream form).
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Accepted for compatibility (the Nix wrapper passes it); vmrig logs everything.
    #[arg(long, hide = true)]
    pub log_level: Option<String>,
    /// Accepted for compatibility; vmrig has no debug hook.
    #[arg(long, hide = true)]
    pub debug_hook_attach: Option<String>,
    /// Accepted for compatibility; vmrig has no SSH backdoor.
    #[arg(long, hide = true)]
    pub dump_vsocks: Option<u32>,
    /// Boot every machine cold: no boot snapshots for start scripts written by
    /// `vmrig build --start-scripts` (other start scripts always boot cold).
    #[arg(long)]
    pub no_snapshots: bool,
    /// The Python interpreter for the test script.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
    /// The test script (a Python file). Env: testScript.
    #[arg(value_name = "TESTSCRIPT")]
    pub testscript: Option<PathBuf>,
}

/// The upstream `--config` file (pydantic `DriverConfiguration`).
#[derive(Debug, serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    vms: std::collections::BTreeMap<String, ConfigMachine>,
    #[serde(default)]
    containers: std::collections::BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    vlans: Vec<u8>,
    #[serde(default)]
    global_timeout: Option<serde_json::Value>,
    test_script: Option<PathBuf>,
}

#[derive(Debug, serde::Deserialize)]
struct ConfigMachine {
    name: Option<String>,
    start_script: String,
}

/// Resolves the command line, the environment (`env`) and the config file into a run.
pub fn resolve(args: &NixosArgs, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<NixosRun> {
    let list = |flag: &Option<Vec<String>>, var: &str| -> Option<Vec<String>> {
        flag.clone()
            .or_else(|| env(var).map(|v| v.split_whitespace().map(str::to_owned).collect()))
    };
    let config = match &args.config {
        Some(path) => Some(read_config(path)?),
        None => None,
    };
    for containers in [
        list(&args.container_names, "containerNames"),
        list(&args.container_start_scripts, "containerStartScripts"),
    ] {
        if containers.is_some_and(|c| !c.is_empty()) {
            bail!("containers (systemd-nspawn machines) are not supported by vmrig: only VMs");
        }
    }
    if config.as_ref().is_some_and(|c| !c.containers.is_empty()) {
        bail!("containers (systemd-nspawn machines) are not supported by vmrig: only VMs");
    }

    let mut machines: Vec<(Option<String>, String)> = Vec::new();
    let names = list(&args.vm_names, "vmNames");
    let vm_scripts = list(&args.vm_start_scripts, "vmStartScripts");
    match (names, vm_scripts) {
        (Some(names), Some(scripts)) => {
            if names.len() != scripts.len() {
                bail!(
                    "the number of vm names and vm start scripts must be the same: {names:?} vs. {scripts:?}"
                );
            }
            machines.extend(names.into_iter().map(Some).zip(scripts));
        }
        (None, Some(scripts)) => machines.extend(scripts.into_iter().map(|s| (None, s))),
        (Some(names), None) if !names.is_empty() => {
            bail!("--vm-names {names:?} without --vm-start-scripts")
        }
        _ => {}
    }
    if let Some(scripts) = list(&args.start_scripts, "startScripts") {
        machines.extend(scripts.into_iter().map(|s| (None, s)));
    }
    if machines.is_empty() {
        if let Some(config) = &config {
            machines.extend(config.vms.iter().map(|(key, vm)| {
                (
                    Some(vm.name.clone().unwrap_or_else(|| key.clone())),
                    vm.start_script.clone(),
                )
            }));
        }
    }

    let vlans = match list(&args.vlans, "vlans") {
        Some(vlans) => vlans
            .iter()
            .map(|v| {
                v.parse::<u8>()
                    .with_context(|| format!("`{v}` is not a VLAN number (1-255)"))
            })
            .collect::<anyhow::Result<Vec<u8>>>()?,
        None => config.as_ref().map(|c| c.vlans.clone()).unwrap_or_default(),
    };
    let global_timeout = match args.global_timeout {
        Some(secs) => secs,
        None => match env("globalTimeout") {
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("globalTimeout=`{v}` is not a number of seconds"))?,
            None => match config.as_ref().and_then(|c| c.global_timeout.as_ref()) {
                Some(v) => parse_timedelta(v)?,
                None => DEFAULT_GLOBAL_TIMEOUT,
            },
        },
    };
    let test_script = args
        .testscript
        .clone()
        .or_else(|| env("testScript").map(PathBuf::from))
        .or_else(|| config.as_ref().and_then(|c| c.test_script.clone()))
        .context("no test script: pass it as an argument, set testScript, or use --config")?;
    let out_dir = match &args.output_directory {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("the current directory")?,
    };
    if !out_dir.is_dir() {
        bail!(
            "{} is not a directory (-o/--output_directory)",
            out_dir.display()
        );
    }
    Ok(NixosRun {
        machines,
        vlans,
        test_script,
        out_dir: out_dir.canonicalize().unwrap_or(out_dir),
        keep_vm_state: args.keep_vm_state,
        global_timeout: Duration::from_secs(global_timeout),
        interactive: args.interactive && !args.no_interactive,
        python: args.python.clone(),
        reporters: Vec::new(),
        snapshots: !args.no_snapshots,
    })
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the driver configuration {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a NixOS driver configuration (expected JSON with vms, vlans, global_timeout, test_script)",
            path.display()
        )
    })
}

/// A pydantic `timedelta`: seconds (number or numeric string), `[D,]HH:MM:SS`, or ISO 8601
/// (`PT1H30M`, `P1DT2H`).
fn parse_timedelta(v: &serde_json::Value) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("global_timeout {v} is not a duration (seconds or ISO 8601)");
    if let Some(n) = v.as_f64() {
        return Ok(n.max(0.0).round() as u64);
    }
    let s = v.as_str().ok_or_else(bad)?.trim();
    if let Ok(n) = s.parse::<f64>() {
        return Ok(n.max(0.0).round() as u64);
    }
    if let Some(iso) = s.strip_prefix('P') {
        let (days, time) = iso.split_once('T').unwrap_or((iso, ""));
        let mut total = 0.0;
        let mut add = |part: &str, units: &[(char, f64)]| -> anyhow::Result<()> {
            let mut num = String::new();
            for c in part.chars() {
                if let Some((_, mult)) = units.iter().find(|(u, _)| *u == c) {
                    total += num.parse::<f64>().map_err(|_| bad())? * mult;
                    num.clear();
                } else {
                    num.push(c);
                }
            }
            if num.is_empty() {
                Ok(())
            } else {
                Err(bad())
            }
        };
        add(days, &[('W', 604800.0), ('D', 86400.0)])?;
        add(time, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
        return Ok(total.round() as u64);
    }
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() == 3 {
        let h: u64 = parts[0].parse().map_err(|_| bad())?;
        let m: u64 = parts[1].parse().map_err(|_| bad())?;
        let sec: f64 = parts[2].parse().map_err(|_| bad())?;
        return Ok(h * 3600 + m * 60 + sec.round() as u64);
    }
    Err(bad())
}

/// `generate-driver-symbols`: writes `driver-symbols` (the script's global names, comma
/// separated) into the current directory, as the upstream program does for pyflakes.
pub fn generate_driver_symbols() -> anyhow::Result<i32> {
    let python = std::env::var_os("VMRIG_PYTHON").unwrap_or_else(|| "python3".into());
    let symbols = vmrig_python::driver_symbols(Path::new(&python))?;
    std::fs::write("driver-symbols", symbols.join(",")).context("writing driver-symbols")?;
    Ok(exit::OK)
}

/// Runs it: exit 0 passed, 1 failed, 143 global timeout (as upstream, which ends itself
/// with SIGTERM), 2 usage or script syntax error, 4 infrastructure.
pub fn run(args: NixosArgs) -> anyhow::Result<i32> {
    let mut run = resolve(&args, &|var| std::env::var(var).ok())?;
    let junit = args.junit_xml.as_ref().map(|p| run.out_dir.join(p));
    let collector = junit
        .as_ref()
        .map(|_| std::sync::Arc::new(vmrig_driver::junit::JunitCollector::new()));
    if let Some(c) = &collector {
        run.reporters.push(c.clone());
    }
    let outcome = vmrig_driver::nixos::run_nixos(&run)?;
    if let (Some(path), Some(c)) = (&junit, &collector) {
        let mut report = vmrig_driver::junit::JunitReport::new();
        report.add_run("nixos-test", c, Some(&run.out_dir));
        report
            .write(path)
            .with_context(|| format!("writing the JUnit report {}", path.display()))?;
        let _ = vmrig_driver::html_report::add_link(&run.out_dir, path);
    }
    Ok(if outcome.timed_out {
        143
    } else if outcome.failure.is_some() {
        exit::TEST_FAILED
    } else {
        exit::OK
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<NixosRun> {
        let args = NixosArgs::try_parse_from(
            std::iter::once("nixos-test-driver").chain(argv.iter().copied()),
        )?;
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(&args, &|k| env.get(k).cloned())
    }

    fn named(run: &NixosRun) -> Vec<(Option<&str>, &str)> {
        run.machines
            .iter()
            .map(|(n, s)| (n.as_deref(), s.as_str()))
            .collect()
    }

    #[test]
    fn old_flags() {
        let run = parse(
            &[
                "--start-scripts",
                "/a/run-server-vm",
                "/a/run-client-vm",
                "--vlans",
                "1",
                "2",
                "-K",
                "--global-timeout",
                "60",
                "-o",
                "/tmp",
                "--",
                "t.py",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            named(&run),
            [(None, "/a/run-server-vm"), (None, "/a/run-client-vm")]
        );
        assert_eq!(run.vlans, [1, 2]);
        assert!(run.keep_vm_state);
        assert_eq!(run.global_timeout, Duration::from_secs(60));
        assert_eq!(run.test_script, PathBuf::from("t.py"));
    }

    #[test]
    fn environment_variables() {
        let run = parse(
            &["-o", "/tmp"],
            &[
                ("startScripts", "/a/run-server-vm  /a/run-client-vm"),
                ("vlans", "1"),
                ("testScript", "/s/t.py"),
                ("globalTimeout", "120"),
            ],
        )
        .unwrap();
        assert_eq!(run.machines.len(), 2);
        assert_eq!(run.vlans, [1]);
        assert_eq!(run.global_timeout, Duration::from_secs(120));
        assert_eq!(run.test_script, PathBuf::from("/s/t.py"));
        // Flags win over the environment.
        let run = parse(
            &["-o", "/tmp", "x.py", "--vlans", "3"],
            &[("vlans", "1"), ("testScript", "/s/t.py")],
        )
        .unwrap();
        assert_eq!(run.vlans, [3]);
        assert_eq!(run.test_script, PathBuf::from("x.py"));
    }

    #[test]
    fn vm_names_form_and_its_env() {
        let run = parse(
            &[
                "--vm-names",
                "a",
                "b",
                "--vm-start-scripts",
                "/x/sa",
                "/x/sb",
                "-o",
                "/tmp",
                "t.py",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(named(&run), [(Some("a"), "/x/sa"), (Some("b"), "/x/sb")]);
        let run = parse(
            &["-o", "/tmp", "t.py"],
            &[("vmNames", "a"), ("vmStartScripts", "/x/sa")],
        )
        .unwrap();
        assert_eq!(named(&run), [(Some("a"), "/x/sa")]);
        let err = parse(
            &[
                "--vm-names",
                "a",
                "b",
                "--vm-start-scripts",
                "/x/sa",
                "-o",
                "/tmp",
                "t.py",
            ],
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("must be the same"), "{err}");
    }

    #[test]
    fn config_file_form() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            r#"{"vms": {"server": {"name": "server", "start_script": "/x/run-server-vm"}},
                "containers": {}, "vlans": [1], "global_timeout": "PT1H30M",
                "enable_ssh_backdoor": false, "test_script": "/x/script.py"}"#,
        )
        .unwrap();
        let out = dir.path().to_string_lossy().into_owned();
        let run = parse(&["--config", config.to_str().unwrap(), "-o", &out], &[]).unwrap();
        assert_eq!(named(&run), [(Some("server"), "/x/run-server-vm")]);
        assert_eq!(run.vlans, [1]);
        assert_eq!(run.global_timeout, Duration::from_secs(5400));
        assert_eq!(run.test_script, PathBuf::from("/x/script.py"));
    }

    #[test]
    fn timedeltas() {
        use serde_json::json;
        assert_eq!(parse_timedelta(&json!(90)).unwrap(), 90);
        assert_eq!(parse_timedelta(&json!("3600")).unwrap(), 3600);
        assert_eq!(parse_timedelta(&json!("PT2M5S")).unwrap(), 125);
        assert_eq!(parse_timedelta(&json!("P1DT1S")).unwrap(), 86401);
        assert_eq!(parse_timedelta(&json!("01:00:30")).unwrap(), 3630);
        assert!(parse_timedelta(&json!("soon")).is_err());
    }

    #[test]
    fn bad_input_is_explained() {
        let err = parse(&["-o", "/tmp"], &[]).unwrap_err();
        assert!(err.to_string().contains("no test script"), "{err}");
        let err = parse(&["-o", "/nonexistent-dir", "t.py"], &[]).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        let err = parse(&["--vlans", "x", "-o", "/tmp", "t.py"], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("not a VLAN number"), "{err:#}");
        let err = parse(&["--container-names", "c", "-o", "/tmp", "t.py"], &[]).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}
