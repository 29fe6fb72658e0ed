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

pub const BACKDOOR_UNIT: &str = "[Unit]
Description=vmrig backdoor shell for the test driver (hvc0)
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/local/lib/vmrig/backdoor
KillSignal=SIGHUP
StandardInput=null
StandardOutput=journal+console

[Install]
WantedBy=sysinit.target
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
    GuestFile {
        path: "/etc/hostname",
        mode: 0o644,
        text: "vmrig\n",
    },
];

/// `(link, target)` pairs: the backdoor enabled, and units a test VM must not run.
pub const GUEST_SYMLINKS: &[(&str, &str)] = &[
    (
        "/etc/systemd/system/sysinit.target.wants/vmrig-backdoor.service",
        "../vmrig-backdoor.service",
    ),
    // Debian's getty generator starts a login on hvc0 and would steal the backdoor's console.
    ("/etc/systemd/system/serial-getty@hvc0.service", "/dev/null"),
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
    for (link, target) in GUEST_SYMLINKS {
        let dir = link.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
        s.push_str(&format!(
            "mkdir -p \"$1{dir}\"\nln -sfn '{target}' \"$1{link}\"\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_script_creates_files_under_the_given_root() {
        let dir = tempfile::tempdir().unwrap();
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
        let masked = dir
            .path()
            .join("etc/systemd/system/serial-getty@hvc0.service");
        assert_eq!(
            std::fs::read_link(masked).unwrap().to_str(),
            Some("/dev/null")
        );
    }

    #[test]
    fn backdoor_announces_the_banner_the_driver_waits_for() {
        assert!(BACKDOOR_SCRIPT.contains("echo \"Spawning backdoor root shell...\""));
    }
}
