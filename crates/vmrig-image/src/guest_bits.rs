//! vmrig's own files inside every root image: the NixOS-compatible backdoor shell on
//! `/dev/hvc0` and the systemd settings a test VM needs.

/// A file that the image builder writes into the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    pub path: &'static str,
    pub mode: u32,
    pub text: &'static str,
}

/// The backdoor, as in NixOS's test instrumentation: a root bash reading commands from the
/// virtio console, stderr to the serial port, announcing itself with the banner the driver
/// waits for. It waits (bounded) for `/dev/hvc0` itself instead of depending on udev, so
/// it starts as soon as systemd does.
pub const BACKDOOR_SCRIPT: &str = r#"#!/bin/bash
export USER=root HOME=/root LOGNAME=root TERM=dumb
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -e /etc/vmrig/environment ]; then . /etc/vmrig/environment; fi
cd /root 2>/dev/null || cd /
for ((i = 0; i < 400; i++)); do [ -e /dev/hvc0 ] && break; sleep 0.05; done
exec < /dev/hvc0 > /dev/hvc0
while ! exec 2> /dev/ttyS0; do sleep 0.1; done
echo "connecting to host..." >&2
stty -F /dev/hvc0 raw -echo
echo "Spawning backdoor root shell..."
PS1="" exec /bin/bash --norc /dev/hvc0
"#;

/// The backdoor's unit. It depends on nothing (not even journald: output to the journal
/// would order it after systemd-journald.socket; its output goes to the console, and the
/// script sends it to hvc0/ttyS0 itself), so systemd starts it in the first batch of jobs.
/// `StartupCPUWeight` puts it first in systemd's run queue and gives it the CPU over the
/// other boot jobs until boot has finished (one vCPU under TCG is shared by everything
/// that starts at once); afterwards it has the default weight again.
pub const BACKDOOR_UNIT: &str = "[Unit]
Description=vmrig backdoor shell for the test driver (hvc0)
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/local/lib/vmrig/backdoor
KillSignal=SIGHUP
StandardInput=null
StandardOutput=tty
TTYPath=/dev/console
StartupCPUWeight=1000

[Install]
WantedBy=sysinit.target
";

/// journald keeps the journal in /run: a test VM's disk is thrown away anyway, and the
/// flush to /var (systemd-journal-flush.service, masked below) costs over a second of boot
/// under TCG. `journalctl` works as usual. As in NixOS test VMs, every message (debug
/// level too) is also forwarded to the serial console, so the console log (and
/// `wait_for_console_text`) sees what services log.
pub const JOURNALD_CONF: &str = "# vmrig: the journal lives in /run (test VMs are thrown away),
# and goes to the serial console as in NixOS test VMs.
[Journal]
Storage=volatile
ForwardToConsole=yes
MaxLevelConsole=debug
TTYPath=/dev/ttyS0
";

/// systemd's manager settings of NixOS's test instrumentation: generous timeouts (a
/// loaded TCG host is slow), no status lines on the console (the journal is there).
pub const SYSTEM_CONF: &str = "# vmrig: as NixOS's test instrumentation.
[Manager]
ShowStatus=false
DefaultTimeoutStartSec=300
DefaultDeviceTimeoutSec=300
";

/// Kernel settings of NixOS's test instrumentation: a hung task is reported after 10
/// minutes, not 2 (TCG is slow), and running out of memory panics (and so ends the VM,
/// which a test sees) instead of the OOM killer picking a victim.
pub const SYSCTL_CONF: &str = "# vmrig: as NixOS's test instrumentation.
kernel.hung_task_timeout_secs = 600
vm.panic_on_oom = 2
";

/// Drivers that udev would load for QEMU's emulated hardware that no test uses (the PC
/// speaker, the floppy controller of the `pc` machine type should a VM use it, q35's
/// built-in SATA controller without disks, its LPC bridge and SMBus, the PS/2 mouse and
/// raw serio ports, QEMU's fw_cfg interface); each costs a good part of a second under
/// TCG, and udev's workers load them while the network cards wait. `blacklist` only
/// stops loading by alias: `modprobe psmouse` still works (every module of the kernel is
/// there).
pub const MODPROBE_BLACKLIST: &str = "# vmrig: not loaded automatically in test VMs.
blacklist floppy
blacklist pcspkr
blacklist ahci
blacklist lpc_ich
blacklist i2c_i801
blacklist psmouse
blacklist serio_raw
blacklist qemu_fw_cfg
";

/// udev loads a module for every CPU feature that has one: kvm_intel/kvm_amd for
/// vmx/svm, and the accelerated crypto drivers (aesni_intel, sha*_ssse3, ghash, crc32
/// and crct10dif with pclmul): over a second at boot under TCG. Without a CPU
/// `MODALIAS` nothing is loaded at boot; the kernel's crypto API still loads the
/// accelerated drivers when something asks for the algorithm, and nested
/// virtualisation needs `modprobe kvm_intel` (or kvm_amd) first.
pub const UDEV_RULES: &str = "# vmrig: no module autoloading for CPU features in test VMs.
SUBSYSTEM==\"cpu\", ENV{MODALIAS}=\"\"
";

/// udev's coldplug without the `subsystems` half (module, bus and driver objects, about
/// 220 events that no rule uses): the `devices` half is what makes device units and
/// /dev links. Otherwise Debian's command.
pub const UDEV_TRIGGER_DROPIN: &str = "# vmrig: coldplug devices only.
[Service]
ExecStart=
ExecStart=-udevadm trigger --type=devices --action=add --prioritized-subsystem=block,tpmrm,net,tty,input
";

/// Where the cards' `ip -batch` files live (eth0's in the image, the VLAN cards' in the
/// per-node layer).
pub const NETWORK_DIR: &str = "/etc/vmrig/network";

/// One instance per network card, as NixOS's `network-addresses-<card>.service`: after
/// udev has seen the card (its device unit; udev's rules and the card's sysctls have been
/// applied then) and after `network-pre.target` (the firewall), before `network.target`
/// and `network-online.target`, which it pulls in. One `ip` process per card, by its full
/// path: a test may put other tools first in PATH (busybox's `ip` cannot read a batch file).
pub const NETWORK_UNIT: &str = "[Unit]
Description=vmrig: addresses of %i
BindsTo=sys-subsystem-net-devices-%i.device
After=sys-subsystem-net-devices-%i.device network-pre.target
Before=network.target network-online.target
Wants=network.target
ConditionPathExists=/etc/vmrig/network/%i

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/ip -batch /etc/vmrig/network/%i

[Install]
WantedBy=multi-user.target
";

/// eth0: QEMU user networking, reachable from the host (`forward_port`), no route out
/// and no name servers (tests are hermetic).
pub const ETH0_NETWORK: &str = "# vmrig: QEMU user networking (host only, no route out)
addr replace 10.0.2.15/24 dev eth0
link set dev eth0 up
";

/// The `(link, target)` that enables the network unit of `card`.
pub fn network_unit_link(card: &str) -> (String, String) {
    (
        format!(
            "/etc/systemd/system/multi-user.target.wants/vmrig-network-addresses@{card}.service"
        ),
        "/etc/systemd/system/vmrig-network-addresses@.service".into(),
    )
}

/// NixOS's getty command line: the terminal's name is on it (`agetty ... %I ...`), and
/// tests find a console's getty by it (`pgrep -f 'agetty.*tty1'`); Debian's names the
/// terminal `-` (its stdin). Debian's login prompt options are kept. Named to sort first:
/// systemd applies drop-ins in file-name order across the template's and the instance's
/// directories, so a test's own (an autologin for `getty@tty1`) comes after it and wins.
pub const GETTY_DROPIN: &str = "[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-- \\\\u' --noreset --noclear --keep-baud %I 115200,38400,9600 $TERM
";

/// Files every image gets. Symlinks are in [`GUEST_SYMLINKS`].
pub const GUEST_FILES: &[GuestFile] = &[
    GuestFile {
        path: "/usr/local/lib/vmrig/backdoor",
        mode: 0o755,
        text: BACKDOOR_SCRIPT,
    },
    GuestFile {
        path: "/etc/systemd/system/vmrig-backdoor.service",
        mode: 0o644,
        text: BACKDOOR_UNIT,
    },
    // An empty fstab: the root is mounted by the guest init, nothing else is.
    GuestFile {
        path: "/etc/fstab",
        mode: 0o644,
        text: "# mounted by vmrig's guest init\n",
    },
    // The same id in every image; the per-node layer gives each node its own. A set id
    // keeps systemd out of its slow first-boot path.
    GuestFile {
        path: "/etc/machine-id",
        mode: 0o444,
        text: "8e1a5c4f0d9b4f7e9a3c2b1d0e6f7a8b\n",
    },
    // No name servers, as in NixOS test VMs (tests are hermetic; /etc/hosts names the
    // nodes). Without it the image would keep the build host's, copied in by mmdebstrap.
    GuestFile {
        path: "/etc/resolv.conf",
        mode: 0o644,
        text: "# vmrig: no name servers (tests are hermetic); /etc/hosts names the nodes.\n",
    },
    // New users get bash, as on NixOS (`users.defaultUserShell`); Debian's `useradd`
    // gives /bin/sh, and tests look for a user's `bash` after a login.
    GuestFile {
        path: "/etc/default/useradd",
        mode: 0o644,
        text: "# vmrig: NixOS's default shell for new users\nSHELL=/bin/bash\n",
    },
    GuestFile {
        path: "/etc/hostname",
        mode: 0o644,
        text: "vmrig\n",
    },
    GuestFile {
        path: "/etc/systemd/journald.conf.d/vmrig.conf",
        mode: 0o644,
        text: JOURNALD_CONF,
    },
    GuestFile {
        path: "/etc/systemd/system/vmrig-network-addresses@.service",
        mode: 0o644,
        text: NETWORK_UNIT,
    },
    GuestFile {
        path: "/etc/vmrig/network/eth0",
        mode: 0o644,
        text: ETH0_NETWORK,
    },
    GuestFile {
        path: "/etc/systemd/system.conf.d/vmrig.conf",
        mode: 0o644,
        text: SYSTEM_CONF,
    },
    GuestFile {
        path: "/etc/sysctl.d/60-vmrig.conf",
        mode: 0o644,
        text: SYSCTL_CONF,
    },
    GuestFile {
        path: "/etc/modprobe.d/vmrig.conf",
        mode: 0o644,
        text: MODPROBE_BLACKLIST,
    },
    GuestFile {
        path: "/etc/udev/rules.d/70-vmrig.rules",
        mode: 0o644,
        text: UDEV_RULES,
    },
    GuestFile {
        path: "/etc/systemd/system/getty@.service.d/00-vmrig.conf",
        mode: 0o644,
        text: GETTY_DROPIN,
    },
    GuestFile {
        path: "/etc/systemd/system/systemd-udev-trigger.service.d/vmrig.conf",
        mode: 0o644,
        text: UDEV_TRIGGER_DROPIN,
    },
];

/// Units a test VM does not need, masked: each is a process (or several) at boot, and a
/// process start costs 50-200 ms under TCG. None of them is something a test waits for.
pub const MASKED_UNITS: &[&str] = &[
    // Debian's periodic jobs: nothing to do in a throwaway VM, and they must not fire
    // in the middle of a test.
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    // logrotate (when a package brings it) is off in NixOS test VMs.
    "logrotate.timer",
    "logrotate.service",
    // gettys on tty2..tty6 (Debian's fallback without logind). tty1 keeps its own; the
    // serial lines have none (GUEST_SYMLINKS).
    "getty-static.service",
    // The journal is volatile (see JOURNALD_CONF): nothing to flush.
    "systemd-journal-flush.service",
    // The kernel runs without audit.
    "systemd-journald-audit.socket",
    // The guest init mounts the root read-write, and /etc/fstab is empty.
    "systemd-remount-fs.service",
    // Entropy comes from virtio-rng and the CPU; nothing to carry over between boots.
    "systemd-random-seed.service",
    // utmp/wtmp records (who, last): nothing in a test reads them.
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    // Modules loaded "just in case": the kernel loads dm_mod, loop and fuse on first use
    // of their /dev nodes (kmod-static-nodes), and a test VM has no EFI.
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@loop.service",
    "modprobe@fuse.service",
    "modprobe@configfs.service",
];

/// systemd generators masked: systemd runs every generator, one process each (~100 ms
/// under TCG), before it starts any unit. These are for things a test VM never has
/// (encrypted, verity or integrity volumes, GPT auto-discovery, hibernation, offline
/// updates, /etc/rc.local, `systemd.run=` on the kernel command line), and the getty
/// generator (its only results here would be logins on ttyS0 and hvc0, which a test VM
/// must not have: see [`GUEST_SYMLINKS`]). Kept: fstab (a test's own /etc/fstab),
/// sysv (packages with only an init script) and debug (`systemd.mask=` and friends in
/// a node's `kernel_params`).
pub const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-veritysetup-generator",
];

/// `(link, target)` pairs: the backdoor enabled, and units a test VM must not run.
pub const GUEST_SYMLINKS: &[(&str, &str)] = &[
    (
        "/etc/systemd/system/sysinit.target.wants/vmrig-backdoor.service",
        "../vmrig-backdoor.service",
    ),
    // No getty on either line the backdoor uses, as NixOS's test instrumentation: Debian's
    // getty generator starts a login on hvc0 (it would steal the backdoor's console), and
    // one on the serial console (`console=ttyS0`), whose vhangup makes every other open
    // file of ttyS0 fail with EIO: the backdoor's stderr, so a command writing to stderr
    // would fail (and `grep -q x /nonexistent` exit 0). The generator is masked too; the
    // masks stay for a test that brings it back.
    ("/etc/systemd/system/serial-getty@hvc0.service", "/dev/null"),
    (
        "/etc/systemd/system/serial-getty@ttyS0.service",
        "/dev/null",
    ),
    // eth0 configured by its unit (the VLAN cards' links are in the per-node layer).
    (
        "/etc/systemd/system/multi-user.target.wants/vmrig-network-addresses@eth0.service",
        "/etc/systemd/system/vmrig-network-addresses@.service",
    ),
    // network-online.target is reached at every boot, as on NixOS, so units ordered
    // after it (and `wait_for_unit("network-online.target")`) do not wait for nothing.
    (
        "/etc/systemd/system/multi-user.target.wants/network-online.target",
        "/lib/systemd/system/network-online.target",
    ),
];

/// A shell fragment that creates every guest file under the root directory `$1`.
pub fn install_script() -> String {
    let mut s = String::new();
    for f in GUEST_FILES {
        let dir = f.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
        assert!(
            !f.text.contains("VMRIG_EOF"),
            "heredoc delimiter in {}",
            f.path
        );
        s.push_str(&format!(
            "mkdir -p \"$1{dir}\"\nrm -f \"$1{p}\"\ncat > \"$1{p}\" <<'VMRIG_EOF'\n{t}VMRIG_EOF\nchmod {m:o} \"$1{p}\"\n",
            p = f.path,
            t = f.text,
            m = f.mode
        ));
    }
    let masks = MASKED_UNITS
        .iter()
        .map(|u| (format!("/etc/systemd/system/{u}"), "/dev/null"))
        .chain(
            MASKED_GENERATORS
                .iter()
                .map(|g| (format!("/etc/systemd/system-generators/{g}"), "/dev/null")),
        );
    let links = GUEST_SYMLINKS
        .iter()
        .map(|(l, t)| (l.to_string(), *t))
        .chain(masks);
    for (link, target) in links {
        let dir = link.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
        s.push_str(&format!(
            "mkdir -p \"$1{dir}\"\nln -sfn '{target}' \"$1{link}\"\n"
        ));
    }
    s.push_str(ROOT_PASSWORD_SCRIPT);
    s
}

/// root has an empty password, as in NixOS test VMs (`login` as root on a console works
/// without one).
pub const ROOT_PASSWORD_SCRIPT: &str =
    "if [ -e \"$1/etc/shadow\" ]; then sed -i 's/^root:[^:]*:/root::/' \"$1/etc/shadow\"; fi\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_script_creates_files_under_the_given_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/shadow"),
            "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n",
        )
        .unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("set -e\n{}", install_script()))
            .arg("sh")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let backdoor = dir.path().join("usr/local/lib/vmrig/backdoor");
        assert_eq!(std::fs::read_to_string(&backdoor).unwrap(), BACKDOOR_SCRIPT);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&backdoor).unwrap().permissions().mode() & 0o777,
            0o755
        );
        for masked in [
            "etc/systemd/system/serial-getty@hvc0.service",
            "etc/systemd/system/serial-getty@ttyS0.service",
            "etc/systemd/system/e2scrub_reap.service",
            "etc/systemd/system-generators/systemd-gpt-auto-generator",
        ] {
            let link = std::fs::read_link(dir.path().join(masked)).unwrap();
            assert_eq!(link.to_str(), Some("/dev/null"), "{masked}");
        }
        // No getty is started on the serial line (its vhangup breaks the backdoor's stderr).
        assert!(!dir
            .path()
            .join("etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")
            .exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/systemd/journald.conf.d/vmrig.conf"))
                .unwrap(),
            JOURNALD_CONF
        );
        // root's password is empty, other accounts are left alone.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/shadow")).unwrap(),
            "root::19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n"
        );
        assert!(dir.path().join("etc/sysctl.d/60-vmrig.conf").exists());
        assert!(dir
            .path()
            .join("etc/systemd/system.conf.d/vmrig.conf")
            .exists());
    }

    #[test]
    fn test_instrumentation_settings_as_nixos() {
        for line in [
            "ForwardToConsole=yes",
            "MaxLevelConsole=debug",
            "TTYPath=/dev/ttyS0",
        ] {
            assert!(JOURNALD_CONF.contains(&format!("\n{line}\n")), "{line}");
        }
        for line in [
            "ShowStatus=false",
            "DefaultTimeoutStartSec=300",
            "DefaultDeviceTimeoutSec=300",
        ] {
            assert!(SYSTEM_CONF.contains(&format!("\n{line}\n")), "{line}");
        }
        assert!(SYSCTL_CONF.contains("kernel.hung_task_timeout_secs = 600\n"));
        assert!(SYSCTL_CONF.contains("vm.panic_on_oom = 2\n"));
    }

    #[test]
    fn eth0_link_matches_the_layers_links() {
        let (link, target) = network_unit_link("eth0");
        assert!(GUEST_SYMLINKS.contains(&(link.as_str(), target.as_str())));
        assert!(NETWORK_UNIT.contains("Before=network.target network-online.target\n"));
        assert!(NETWORK_UNIT.contains("BindsTo=sys-subsystem-net-devices-%i.device\n"));
    }

    #[test]
    fn backdoor_unit_waits_for_nothing() {
        // Output to the journal would order it after systemd-journald.socket.
        assert!(!BACKDOOR_UNIT.contains("journal"));
        assert!(BACKDOOR_UNIT.contains("DefaultDependencies=no"));
        assert!(!BACKDOOR_UNIT.contains("After="));
        // (`console` is not a valid StandardOutput= in systemd 252.)
        assert!(BACKDOOR_UNIT.contains("StandardOutput=tty\nTTYPath=/dev/console\n"));
    }

    #[test]
    fn backdoor_announces_the_banner_the_driver_waits_for() {
        assert!(BACKDOOR_SCRIPT.contains("echo \"Spawning backdoor root shell...\""));
    }
}
