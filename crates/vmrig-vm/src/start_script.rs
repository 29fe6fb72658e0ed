//! NixOS-style start scripts (`run-<node>-vm`) for vmrig machines, so that vmrig images run
//! under the upstream NixOS test driver as well as under vmrig's `nixos-driver`.
//!
//! The script holds the machine part of the QEMU command line ([`machine_args`], the one
//! place it is made) and honours what NixOS's scripts honour: `NIX_DISK_IMAGE` (the
//! writable disk, created on first start over the store's root image), `TMPDIR` with
//! `USE_TMPDIR`, `QEMU_OPTS`, `QEMU_NET_OPTS` (appended to eth0's user netdev),
//! `QEMU_KERNEL_PARAMS` and `"$@"`. Each VLAN's NIC joins the switch named by
//! `QEMU_VDE_SOCKET_<n>` (`-netdev vde`), as the NixOS driver sets it. The driver appends
//! its own sockets, console and `-serial stdio` ([`crate::cmdline::nixos_driver_args`]).

use std::path::{Path, PathBuf};

use crate::backdoor::shell_quote;
use crate::cmdline::{machine_args, vlan_netdev_id, vlan_nic_args, VmConfig, USER_NETDEV};

/// Stands for the disk path in the argv until it is rendered as a shell expansion.
const DISK: &str = "@vmrig-disk@";
/// Stands for the end of the kernel command line.
const KERNEL_PARAMS: &str = "@vmrig-kernel-params@";
/// Stands for the end of eth0's netdev.
const NET_OPTS: &str = "@vmrig-net-opts@";

/// What a start script needs besides the machine's [`VmConfig`] (whose `disk`, sockets,
/// `incoming` and VLAN sockets are ignored: those are the caller's at run time).
pub struct StartScript<'a> {
    pub cfg: &'a VmConfig,
    /// The read-only root image the writable disk is layered on (raw).
    pub root_image: &'a Path,
    pub qemu: &'a Path,
    pub qemu_img: &'a Path,
    /// Where the script comes from, for its header comment.
    pub origin: &'a str,
}

/// Starts the line of a script vmrig wrote that says, as JSON ([`ScriptInputs`]), what it
/// boots: the NixOS driver keys boot snapshots of such scripts by it.
pub const INPUTS_MARKER: &str = "# vmrig-start-script: ";

/// What a start script written by vmrig boots, read back from its [`INPUTS_MARKER`] line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScriptInputs {
    /// The node the script was made for.
    pub machine: String,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// Store paths it names (kernel, root image): their names are their contents' hashes.
    pub store_files: Vec<PathBuf>,
    /// Files it names that are not in the store (its initrd, next to the script): keys
    /// must hash their contents.
    pub other_files: Vec<PathBuf>,
    /// The writable disk's file name when `NIX_DISK_IMAGE` is unset (relative to the
    /// script's working directory, the machine's state directory).
    pub default_disk: String,
}

/// The [`ScriptInputs`] of a script's text, if vmrig wrote it.
pub fn read_inputs(text: &str) -> Option<ScriptInputs> {
    text.lines()
        .take(8)
        .find_map(|line| line.strip_prefix(INPUTS_MARKER))
        .and_then(|json| serde_json::from_str(json).ok())
}

/// The script's file name, as NixOS names it (the driver takes the machine name from it).
pub fn file_name(machine: &str) -> String {
    format!("run-{machine}-vm")
}

/// The script's text.
pub fn render(s: &StartScript) -> String {
    let mut cfg = s.cfg.clone();
    cfg.disk = DISK.into();
    cfg.kernel_params.push(KERNEL_PARAMS.into());
    let mut args = machine_args(&cfg);
    for arg in args.iter_mut() {
        if arg.starts_with(USER_NETDEV) {
            arg.push_str(NET_OPTS);
        }
    }
    for (i, nic) in cfg.vlans.iter().enumerate() {
        let placeholder = vde_socket(nic.vlan);
        let netdev = crate::cmdline::vde_netdev(
            &vlan_netdev_id(nic.vlan),
            std::path::Path::new(&placeholder),
        );
        args.extend(vlan_nic_args(nic, i, netdev));
    }
    let name = &cfg.name;
    let inputs = ScriptInputs {
        machine: name.clone(),
        qemu: s.qemu.to_owned(),
        qemu_img: s.qemu_img.to_owned(),
        store_files: vec![s.cfg.kernel.clone(), s.root_image.to_owned()],
        other_files: vec![s.cfg.initrd.clone()],
        default_disk: format!("{name}.qcow2"),
    };
    let mut out = format!(
        "#!/usr/bin/env bash
# {file}: starts the vmrig machine `{name}` the way a NixOS start script does.
# Made by {origin}. It uses store paths: keep them (`vmrig store gc` removes unused ones).
{marker}{inputs}
set -eu
if [ -z \"${{TMPDIR:-}}\" ] || [ -z \"${{USE_TMPDIR:-}}\" ]; then
    TMPDIR=$(mktemp -d nix-vm.XXXXXXXXXX --tmpdir)
fi
NIX_DISK_IMAGE=$(readlink -f \"${{NIX_DISK_IMAGE:-./{name}.qcow2}}\")
if [ ! -e \"$NIX_DISK_IMAGE\" ]; then
    {qemu_img} create -q -f qcow2 -F raw -b {root} \"$NIX_DISK_IMAGE\"
fi
cd \"$TMPDIR\"
# QEMU goes down with this script's parent: the upstream driver starts the script through
# `/bin/sh -c`, and a shell that does not exec its last command (dash) would leave QEMU
# running when the driver stops it. setpriv (util-linux) keeps the pid: QEMU replaces it.
pdeathsig=()
if setpriv --pdeathsig TERM -- true >/dev/null 2>&1; then
    pdeathsig=(setpriv --pdeathsig TERM --)
fi
exec ${{pdeathsig[@]+\"${{pdeathsig[@]}}\"}} {qemu}",
        file = file_name(name),
        origin = s.origin,
        marker = INPUTS_MARKER,
        inputs = serde_json::to_string(&inputs).expect("plain data"),
        qemu_img = shell_quote(&s.qemu_img.to_string_lossy()),
        root = shell_quote(&s.root_image.to_string_lossy()),
        qemu = shell_quote(&s.qemu.to_string_lossy()),
    );
    for arg in &args {
        out.push_str(" \\\n    ");
        out.push_str(&render_arg(arg));
    }
    out.push_str(" \\\n    ${QEMU_OPTS:-} \"$@\"\n");
    out
}

/// Stands for VLAN `vlan`'s switch until it is rendered as `"$QEMU_VDE_SOCKET_<n>"`
/// (failing with a clear message when that is unset).
fn vde_socket(vlan: u8) -> String {
    format!("@vde{vlan}@")
}

/// One argument, single-quoted, with the placeholders turned into expansions.
fn render_arg(arg: &str) -> String {
    let mut quoted = shell_quote(arg);
    quoted = quoted.replace(DISK, "'\"${NIX_DISK_IMAGE//,/,,}\"'");
    quoted = quoted.replace(
        &format!(" {KERNEL_PARAMS}"),
        "'\"${QEMU_KERNEL_PARAMS:+ $QEMU_KERNEL_PARAMS}\"'",
    );
    quoted = quoted.replace(NET_OPTS, "'\"${QEMU_NET_OPTS:+,$QEMU_NET_OPTS}\"'");
    while let Some(start) = quoted.find("@vde") {
        let end = start + quoted[start + 1..].find('@').expect("closed placeholder") + 2;
        let vlan = &quoted[start + 4..end - 1];
        let var = format!("QEMU_VDE_SOCKET_{vlan}");
        let expansion = format!(
            "'\"${{{var}:?is not set: the test driver names the switch of VLAN {vlan} there}}\"'"
        );
        quoted.replace_range(start..end, &expansion);
    }
    // Drop the empty '' pieces the substitutions leave behind.
    quoted.replace("\"''", "\"")
}

/// Stand-ins for QEMU (prints its argv, one per line) and qemu-img (creates the disk
/// file it is asked for), to run rendered scripts in tests.
#[cfg(test)]
pub(crate) fn fake_qemu(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let qemu = dir.join("fake-qemu");
    let qemu_img = dir.join("fake-qemu-img");
    std::fs::write(
        &qemu,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n",
    )
    .unwrap();
    std::fs::write(
        &qemu_img,
        "#!/bin/sh\nfor a; do last=$a; done; : > \"$last\"\n",
    )
    .unwrap();
    for f in [&qemu, &qemu_img] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (qemu, qemu_img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::cmdline::VlanNic;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "server".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "/store/k/vmlinux".into(),
            initrd: "/scripts/server-initrd".into(),
            disk: "/ignored".into(),
            modules_disk: None,
            kernel_params: vec!["foo=bar".into()],
            shell_socket: "/ignored".into(),
            qmp_socket: "/ignored".into(),
            vlans: vec![VlanNic {
                vlan: 1,
                mac: "52:54:00:12:01:02".into(),
                socket: "/ignored".into(),
            }],
            graphics: false,
            firmware: None,
            allow_reboot: true,
            forwards: vec![],
            incoming: None,
            transfer_dir: None,
            shared_dirs: Vec::new(),
        }
    }

    fn script() -> String {
        render(&StartScript {
            cfg: &cfg(),
            root_image: Path::new("/store/r/root.img"),
            qemu: Path::new("/usr/bin/qemu-system-x86_64"),
            qemu_img: Path::new("/usr/bin/qemu-img"),
            origin: "a test",
        })
    }

    #[test]
    fn script_honours_the_nixos_variables() {
        let s = script();
        assert!(s.starts_with("#!/usr/bin/env bash\n"));
        assert!(
            s.contains("'file='\"${NIX_DISK_IMAGE//,/,,}\"',if=virtio"),
            "{s}"
        );
        assert!(
            s.contains("foo=bar'\"${QEMU_KERNEL_PARAMS:+ $QEMU_KERNEL_PARAMS}\""),
            "{s}"
        );
        assert!(
            s.contains("'user,id=user0,restrict=on'\"${QEMU_NET_OPTS:+,$QEMU_NET_OPTS}\""),
            "{s}"
        );
        assert!(
            s.contains("'vde,id=vlan1,sock='\"${QEMU_VDE_SOCKET_1:?"),
            "{s}"
        );
        assert!(s.trim_end().ends_with("${QEMU_OPTS:-} \"$@\""));
        let inputs = read_inputs(&s).expect("vmrig's scripts say what they boot");
        assert_eq!(inputs.machine, "server");
        assert_eq!(inputs.qemu, Path::new("/usr/bin/qemu-system-x86_64"));
        assert_eq!(
            inputs.store_files,
            [
                Path::new("/store/k/vmlinux"),
                Path::new("/store/r/root.img")
            ]
        );
        assert_eq!(inputs.other_files, [Path::new("/scripts/server-initrd")]);
        assert_eq!(inputs.default_disk, "server.qcow2");
        assert_eq!(
            read_inputs("#!/bin/sh\nexec qemu-system-x86_64 \"$@\"\n"),
            None
        );
        assert!(!s.contains("@vmrig") && !s.contains("@vde"), "{s}");
        assert!(
            !s.contains("-serial") && !s.contains("virtconsole"),
            "the driver adds those"
        );
    }

    /// A start script whose fake QEMU records its pid and sleeps, started the way the
    /// upstream driver starts it: by `/bin/sh -c` (here with a command after it, so that
    /// no shell execs the script in its own place). `path` is the PATH it runs with.
    /// Returns the shell and the fake QEMU's pid.
    #[allow(clippy::zombie_processes)] // the caller waits for the shell it gets back
    fn start_sleeping_qemu(dir: &Path, path: &std::ffi::OsStr) -> (std::process::Child, i32) {
        use std::os::unix::fs::PermissionsExt;
        let (_, fake_img) = fake_qemu(dir);
        let qemu = dir.join("sleeping-qemu");
        let pid_file = dir.join("qemu.pid");
        std::fs::write(
            &qemu,
            "#!/bin/sh\necho $$ > \"$FAKE_QEMU_PID\"\nexec sleep 300\n",
        )
        .unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = render(&StartScript {
            cfg: &cfg(),
            root_image: Path::new("/store/r/root.img"),
            qemu: &qemu,
            qemu_img: &fake_img,
            origin: "a test",
        });
        let script = dir.join("run-server-vm");
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut shell = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{}; exit $?",
                shell_quote(&script.to_string_lossy())
            ))
            .current_dir(dir)
            .env("PATH", path)
            .env("TMPDIR", dir)
            .env("USE_TMPDIR", "1")
            .env("QEMU_VDE_SOCKET_1", "/tmp/vde1")
            .env("FAKE_QEMU_PID", &pid_file)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // The pid is QEMU's own (the script and setpriv exec it): wait until the
                // process is the sleep, so the signal below finds it in place.
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "sleep" {
                    return (shell, pid);
                }
            }
            if std::time::Instant::now() >= deadline {
                let _ = shell.kill();
                let _ = shell.wait();
                panic!("the fake QEMU did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Whether `pid` is gone (or a zombie waiting for whoever inherited it).
    fn gone_within(pid: i32, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            if stat.is_empty() || state == Some("Z") {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn terminate(shell: &mut std::process::Child) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(shell.id() as i32, libc::SIGTERM) };
        shell.wait().unwrap();
    }

    /// The upstream driver stops a machine with SIGTERM to the `/bin/sh -c` it started the
    /// script with. Debian's dash does not exec the script, so the signal reaches only the
    /// shell: QEMU must go down by itself (setpriv --pdeathsig).
    #[test]
    fn qemu_goes_down_with_the_shell_that_started_the_script() {
        if std::process::Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--", "true"])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            eprintln!("skipped: no setpriv with --pdeathsig on this host (util-linux)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::var_os("PATH").unwrap();
        let (mut shell, qemu) = start_sleeping_qemu(dir.path(), &path);
        terminate(&mut shell);
        assert!(
            gone_within(qemu, 10),
            "QEMU (pid {qemu}) outlived the shell"
        );
    }

    /// Without setpriv the script still starts QEMU (which then outlives a killed shell:
    /// what the test above guards against).
    #[test]
    fn without_setpriv_the_script_still_starts_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["bash", "readlink", "mktemp", "sleep"] {
            let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
                .map(|d| d.join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{tool} is not on PATH"));
            std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
        }
        let (mut shell, qemu) = start_sleeping_qemu(dir.path(), bin.as_os_str());
        terminate(&mut shell);
        let survived = !gone_within(qemu, 1);
        // SAFETY: the fake QEMU this test started.
        unsafe { libc::kill(qemu, libc::SIGKILL) };
        assert!(
            survived,
            "without setpriv nothing takes QEMU down with the shell"
        );
    }

    /// The rendered script, run by bash with a fake QEMU that prints its argv.
    #[test]
    fn bash_expands_the_script_into_the_expected_argv() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, fake_img) = fake_qemu(dir.path());
        let text = render(&StartScript {
            cfg: &cfg(),
            root_image: Path::new("/store/r/root.img"),
            qemu: &fake,
            qemu_img: &fake_img,
            origin: "a test",
        });
        let script = dir.path().join("run-server-vm");
        std::fs::write(&script, text).unwrap();
        let state = dir.path().join("state,1");
        std::fs::create_dir(&state).unwrap();
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(["-extra", "arg with space"])
            .current_dir(&state)
            .env("TMPDIR", &state)
            .env("USE_TMPDIR", "1")
            .env("QEMU_OPTS", "-m 1024")
            .env("QEMU_NET_OPTS", "hostfwd=tcp::2222-:22")
            .env("QEMU_KERNEL_PARAMS", "quiet=1")
            .env("QEMU_VDE_SOCKET_1", "/tmp/vde1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let argv = String::from_utf8(out.stdout).unwrap();
        let argv: Vec<&str> = argv.lines().collect();
        let after = |flag: &str| argv[argv.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(
            after("-drive"),
            format!(
                "file={}/server.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                state.to_string_lossy().replace(',', ",,")
            )
        );
        assert!(
            state.join("server.qcow2").exists(),
            "the disk is created on first start"
        );
        assert!(after("-append").ends_with(" foo=bar quiet=1"));
        assert_eq!(
            after("-netdev"),
            "user,id=user0,restrict=on,hostfwd=tcp::2222-:22"
        );
        assert!(argv.contains(&"vde,id=vlan1,sock=/tmp/vde1"));
        assert_eq!(
            &argv[argv.len() - 4..],
            ["-m", "1024", "-extra", "arg with space"]
        );

        // Without the VLAN's variable the script says what is missing.
        let out = std::process::Command::new("bash")
            .arg(&script)
            .current_dir(&state)
            .env_remove("QEMU_VDE_SOCKET_1")
            .env("TMPDIR", &state)
            .env("USE_TMPDIR", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("QEMU_VDE_SOCKET_1: is not set"));
    }
}
