//! The QEMU command line: the one place that turns a VM's configuration into argv.
//!
//! Pure: no I/O, so every option is covered by unit tests.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::accel::Accel;

/// A NIC on one of the test's VLANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanNic {
    pub vlan: u8,
    pub mac: String,
    /// The switch port's unix socket (`-netdev stream`).
    pub socket: PathBuf,
}

/// Everything that decides a VM's QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The VM's own copy-on-write qcow2 layer over the store's read-only root image.
    pub disk: PathBuf,
    /// Extra kernel parameters (the node's `kernel_params`).
    pub kernel_params: Vec<String>,
    /// Unix socket the driver listens on for the backdoor shell (virtio console, hvc0).
    pub shell_socket: PathBuf,
    /// Unix socket the driver listens on for QMP.
    pub qmp_socket: PathBuf,
    pub vlans: Vec<VlanNic>,
    pub graphics: bool,
    /// `-bios` image; qboot boots about 1.7 s faster than SeaBIOS.
    pub firmware: Option<PathBuf>,
    /// Without it the guest reboots in place; NixOS's `start(allow_reboot=False)` adds `-no-reboot`.
    pub allow_reboot: bool,
    /// Host ports forwarded to the guest through eth0 (QEMU user networking).
    pub forwards: Vec<(u16, u16)>,
    /// Start from a saved state (a migration stream file) instead of booting.
    pub incoming: Option<PathBuf>,
}

/// The kernel command line every vmrig guest gets before the node's own parameters.
pub const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "loglevel=4",
    // Stable NIC names: eth0 user networking, eth1.. the VLANs in order.
    "net.ifnames=0",
    "biosdevname=0",
    // Test VMs need no speculative-execution mitigations, and TCG pays dearly for them.
    "mitigations=off",
    "tsc=reliable",
    "no_timer_check",
    "random.trust_cpu=on",
    "8250.nr_uarts=1",
    "systemd.show_status=false",
    // The kernel's self-tests of every crypto algorithm it registers cost ~0.8 s of boot
    // under TCG; the algorithms are the distribution's, tested upstream.
    "cryptomgr.notests",
];

/// The full kernel command line.
pub fn kernel_command_line(cfg: &VmConfig) -> String {
    let mut params: Vec<&str> = BASE_KERNEL_PARAMS.to_vec();
    if cfg.graphics {
        // Debian's kernel defers drawing the framebuffer console until new output comes,
        // which leaves a graphics node's screen blank (no login prompt to see or OCR).
        params.push("fbcon=nodefer");
    }
    params.extend(cfg.kernel_params.iter().map(String::as_str));
    params.join(" ")
}

/// QEMU escapes commas in option values by doubling them.
pub fn qemu_escape(path: &std::path::Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The argv after the program name: the machine, its VLAN NICs on vmrig's switch, and the
/// driver's channels.
pub fn qemu_args(cfg: &VmConfig) -> Vec<OsString> {
    let mut a = machine_args(cfg);
    for (i, nic) in cfg.vlans.iter().enumerate() {
        let netdev = format!(
            "stream,id={},server=off,addr.type=unix,addr.path={}",
            vlan_netdev_id(nic.vlan),
            qemu_escape(&nic.socket)
        );
        a.extend(vlan_nic_args(nic, i, netdev));
    }
    a.extend(driver_args(cfg));
    a.into_iter().map(OsString::from).collect()
}

/// The machine itself, as a NixOS start script holds it: hardware, kernel, disk, eth0.
/// Without the VLAN NICs ([`vlan_nic_args`]) and what the driver adds ([`driver_args`]).
pub fn machine_args(cfg: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        cfg.name.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // q35 rather than pc (i440fx): pc routes each PCI device's interrupt through ACPI
        // link devices whose AML costs ~130 ms per device under TCG (0.7 s for vmrig's
        // five virtio devices); q35's links are fixed GSIs. It also has no floppy.
        "-machine".into(),
        "q35".into(),
    ];
    match cfg.accel {
        Accel::Kvm => {
            a.extend(["-accel", "kvm", "-cpu", "host,arch-capabilities=off"].map(String::from))
        }
        Accel::Tcg => a.extend(["-accel", "tcg,thread=multi", "-cpu", "max"].map(String::from)),
    }
    a.extend([
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-smp".into(),
        cfg.cpus.to_string(),
    ]);
    if let Some(fw) = &cfg.firmware {
        a.extend(["-bios".into(), qemu_escape(fw)]);
    }
    a.extend([
        "-kernel".into(),
        qemu_escape(&cfg.kernel),
        "-initrd".into(),
        qemu_escape(&cfg.initrd),
        "-append".into(),
        kernel_command_line(cfg),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            qemu_escape(&cfg.disk)
        ),
        "-vga".into(),
        if cfg.graphics { "std" } else { "none" }.into(),
        "-display".into(),
        "none".into(),
    ]);
    // eth0: QEMU user networking, restricted (no route out: tests are hermetic), only for
    // forward_port. Fixed PCI slots keep eth0, eth1, ... in this order.
    let mut user = String::from(USER_NETDEV);
    for (host, guest) in &cfg.forwards {
        user.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    a.extend([
        "-netdev".into(),
        user,
        "-device".into(),
        "virtio-net-pci,netdev=user0,addr=0x10,mac=52:54:00:12:34:56".into(),
    ]);
    a
}

/// eth0's backend: user networking with `restrict=on` (the guest reaches nothing outside).
pub const USER_NETDEV: &str = "user,id=user0,restrict=on";

/// The netdev id of VLAN `vlan`'s NIC.
pub fn vlan_netdev_id(vlan: u8) -> String {
    format!("vlan{vlan}")
}

/// The `index`th VLAN NIC (eth1, eth2, ...) with the given `-netdev` value (vmrig's
/// `stream` socket, or `vde` in start scripts).
pub fn vlan_nic_args(nic: &VlanNic, index: usize, netdev: String) -> Vec<String> {
    vec![
        "-netdev".into(),
        netdev,
        "-device".into(),
        format!(
            "virtio-net-pci,netdev={},addr={:#x},mac={}",
            vlan_netdev_id(nic.vlan),
            0x11 + index,
            nic.mac
        ),
    ]
}

/// What vmrig's driver adds to the machine: reboot policy, the serial console on stdio,
/// the backdoor's virtio console, QMP, entropy and a saved state to start from. (A NixOS
/// driver adds its own equivalents to a start script: [`nixos_driver_args`].)
pub fn driver_args(cfg: &VmConfig) -> Vec<String> {
    let mut a = Vec::new();
    if !cfg.allow_reboot {
        a.push("-no-reboot".into());
    }
    a.extend([
        // Serial console on stdout: the driver reads it line by line.
        "-serial".into(),
        "stdio".into(),
        "-device".into(),
        "virtio-serial-pci".into(),
        "-chardev".into(),
        format!("socket,id=shell,path={}", qemu_escape(&cfg.shell_socket)),
        "-device".into(),
        "virtconsole,chardev=shell".into(),
        "-chardev".into(),
        format!("socket,id=qmp,path={}", qemu_escape(&cfg.qmp_socket)),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // Entropy at once: otherwise early userspace waits for the crng.
        "-device".into(),
        "virtio-rng-pci".into(),
    ]);
    if let Some(state) = &cfg.incoming {
        // QEMU runs the exec: URI through /bin/sh.
        a.extend([
            "-incoming".into(),
            format!(
                "exec:cat {}",
                crate::backdoor::shell_quote(&state.to_string_lossy())
            ),
        ]);
    }
    a
}

/// The sockets a NixOS test driver gives a start script (all in the machine's state dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixosSockets {
    /// QMP: QEMU listens (`server=on,wait=off`), the driver connects.
    pub qmp: PathBuf,
    /// The human monitor: the driver listens, QEMU connects.
    pub monitor: PathBuf,
    /// The backdoor's virtio console: the driver listens, QEMU connects.
    pub shell: PathBuf,
}

/// What the upstream NixOS driver appends to a start script's command (its
/// `StartCommand.cmd`): QMP, monitor, the backdoor console, entropy, serial on stdio,
/// `-no-reboot` unless reboots are allowed, and `-nographic` when there is no display.
pub fn nixos_driver_args(
    sockets: &NixosSockets,
    allow_reboot: bool,
    nographic: bool,
) -> Vec<String> {
    let mut a = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qemu_escape(&sockets.qmp)),
        "-monitor".into(),
        format!("unix:{}", qemu_escape(&sockets.monitor)),
        "-chardev".into(),
        format!("socket,id=shell,path={}", qemu_escape(&sockets.shell)),
        "-device".into(),
        "virtio-serial".into(),
        "-device".into(),
        "virtconsole,chardev=shell".into(),
        "-device".into(),
        "virtio-rng-pci".into(),
        "-serial".into(),
        "stdio".into(),
    ];
    if !allow_reboot {
        a.push("-no-reboot".into());
    }
    if nographic {
        a.push("-nographic".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            name: "server".into(),
            accel: Accel::Tcg,
            memory_mib: 1024,
            cpus: 2,
            kernel: "/store/k/vmlinuz".into(),
            initrd: "/run/server/initrd".into(),
            disk: "/run/server/disk,1.qcow2".into(),
            kernel_params: vec!["foo=bar".into()],
            shell_socket: "/run/server/shell".into(),
            qmp_socket: "/run/server/qmp".into(),
            vlans: vec![VlanNic {
                vlan: 1,
                mac: "52:54:00:12:01:02".into(),
                socket: "/run/vlan1/server.sock".into(),
            }],
            graphics: false,
            firmware: Some("/usr/share/qemu/qboot.rom".into()),
            allow_reboot: false,
            forwards: vec![(8080, 80)],
            incoming: None,
        }
    }

    fn joined(cfg: &VmConfig) -> String {
        qemu_args(cfg)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn golden_command_line() {
        let line = joined(&config());
        let expected = "-name server -nodefaults -no-user-config -machine q35 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 -bios /usr/share/qemu/qboot.rom -kernel /store/k/vmlinuz -initrd /run/server/initrd -append console=ttyS0 panic=-1 quiet loglevel=4 net.ifnames=0 biosdevname=0 mitigations=off tsc=reliable no_timer_check random.trust_cpu=on 8250.nr_uarts=1 systemd.show_status=false cryptomgr.notests foo=bar -drive file=/run/server/disk,,1.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap -vga none -display none -netdev user,id=user0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80 -device virtio-net-pci,netdev=user0,addr=0x10,mac=52:54:00:12:34:56 -netdev stream,id=vlan1,server=off,addr.type=unix,addr.path=/run/vlan1/server.sock -device virtio-net-pci,netdev=vlan1,addr=0x11,mac=52:54:00:12:01:02 -no-reboot -serial stdio -device virtio-serial-pci -chardev socket,id=shell,path=/run/server/shell -device virtconsole,chardev=shell -chardev socket,id=qmp,path=/run/server/qmp -mon chardev=qmp,mode=control -device virtio-rng-pci";
        assert_eq!(line, expected);
    }

    #[test]
    fn nixos_driver_appends_what_upstream_does() {
        let sockets = NixosSockets {
            qmp: "/s/qmp".into(),
            monitor: "/s/monitor".into(),
            shell: "/s/shell".into(),
        };
        assert_eq!(
            nixos_driver_args(&sockets, false, true).join(" "),
            "-qmp unix:/s/qmp,server=on,wait=off -monitor unix:/s/monitor -chardev socket,id=shell,path=/s/shell -device virtio-serial -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio -no-reboot -nographic"
        );
        assert!(!nixos_driver_args(&sockets, true, false)
            .iter()
            .any(|a| a == "-no-reboot" || a == "-nographic"));
    }

    #[test]
    fn incoming_state_is_read_with_a_quoted_path() {
        let mut cfg = config();
        cfg.incoming = Some("/store/it's/state".into());
        assert!(
            joined(&cfg).ends_with("-incoming exec:cat '/store/it'\\''s/state'"),
            "{}",
            joined(&cfg)
        );
    }

    #[test]
    fn kvm_uses_host_cpu_without_arch_capabilities() {
        let mut cfg = config();
        cfg.accel = Accel::Kvm;
        assert!(joined(&cfg).contains("-accel kvm -cpu host,arch-capabilities=off"));
    }

    #[test]
    fn reboot_and_graphics_switches() {
        let mut cfg = config();
        cfg.allow_reboot = true;
        cfg.graphics = true;
        let line = joined(&cfg);
        assert!(!line.contains("-no-reboot"));
        assert!(line.contains("-vga std -display none"));
    }

    #[test]
    fn nics_get_consecutive_slots_in_vlan_order() {
        let mut cfg = config();
        cfg.vlans.push(VlanNic {
            vlan: 2,
            mac: "52:54:00:12:02:02".into(),
            socket: "/run/vlan2/server.sock".into(),
        });
        let line = joined(&cfg);
        assert!(line.contains("netdev=vlan1,addr=0x11,mac=52:54:00:12:01:02"));
        assert!(line.contains("netdev=vlan2,addr=0x12,mac=52:54:00:12:02:02"));
    }
}
