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
    /// The kernel's modules as a read-only ext4 image (shared by every VM of that kernel),
    /// attached as a second virtio disk that the guest init mounts on /lib/modules/<v>.
    pub modules_disk: Option<PathBuf>,
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
    /// A host directory the guest can mount over 9p (tag [`TRANSFER_TAG`]): copies between
    /// host and guest go through it. Mounted only while copying (QEMU refuses to save a VM
    /// while a 9p export is mounted), so boot snapshots are unaffected.
    pub transfer_dir: Option<PathBuf>,
    /// Host directories the guest mounts over 9p once it is up: (mount tag, host path).
    pub shared_dirs: Vec<(String, PathBuf)>,
}

/// The 9p mount tag of [`VmConfig::transfer_dir`].
pub const TRANSFER_TAG: &str = "vmrig-xfer";

/// A host directory exported over 9p with the mount tag `tag`. security_model=none: files
/// keep their modes, and whatever the guest writes belongs to the user running QEMU.
fn virtfs(id: &str, tag: &str, dir: &std::path::Path) -> [String; 4] {
    [
        "-fsdev".into(),
        format!(
            "local,id={id},path={},security_model=none",
            qemu_escape(dir)
        ),
        "-device".into(),
        format!("virtio-9p-pci,fsdev={id},mount_tag={tag}"),
    ]
}

/// How the guest mounts a shared directory (`mount -t 9p -o <this> <tag> <dir>`): virtio
/// transport, the Linux protocol, 512 kB messages (the guest kernel's largest), no caching
/// (host and guest both write while it is mounted).
pub const NINEP_MOUNT_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=512000,cache=none";

/// How the guest mounts the transfer directory for one copy: cached (`loose`), since only
/// the copy uses it while it is mounted. Measured under TCG, 100 MB: `cp` out of the share
/// 8.4 s with `cache=none`, 2.4 s with `loose`; into it 6.2 s and 1.7 s.
pub const TRANSFER_MOUNT_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=512000,cache=loose";

/// The kernel command line every vmrig guest gets before the node's own parameters.
pub const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    // As NixOS test VMs: a panic reboots after 1 s (QEMU, started with -no-reboot, exits),
    // and every kernel message up to debug goes to the console (the serial log).
    "panic=1",
    "loglevel=7",
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

/// Tells the guest init which disk holds the kernel's modules (by its ext4 label).
pub const MODULES_PARAM: &str = "vmrig.modules=LABEL=vmrig-modules";

/// The PCI slot of the modules disk: after the root disk (which QEMU places first, so it
/// stays `/dev/vda`), before the NICs (0x10 and up).
pub const MODULES_DISK_SLOT: &str = "0xf";

/// The full kernel command line.
pub fn kernel_command_line(cfg: &VmConfig) -> String {
    let mut params: Vec<&str> = BASE_KERNEL_PARAMS.to_vec();
    if cfg.graphics {
        // Debian's kernel defers drawing the framebuffer console until new output comes,
        // which leaves a graphics node's screen blank (no login prompt to see or OCR).
        params.push("fbcon=nodefer");
    }
    if cfg.modules_disk.is_some() {
        params.push(MODULES_PARAM);
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
        let netdev = stream_netdev(&vlan_netdev_id(nic.vlan), &nic.socket);
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
    ]);
    if let Some(modules) = &cfg.modules_disk {
        a.extend([
            "-drive".into(),
            format!(
                "file={},if=none,id=modules,format=raw,readonly=on",
                qemu_escape(modules)
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive=modules,addr={MODULES_DISK_SLOT}"),
        ]);
    }
    a.extend([
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

/// The `-netdev` value that connects the NIC backend `id` to a port socket of vmrig's
/// switch: `stream,id=<id>,server=off,addr.type=unix,addr.path=<sock>`.
pub fn stream_netdev(id: &str, sock: &std::path::Path) -> String {
    format!(
        "stream,id={id},server=off,addr.type=unix,addr.path={}",
        qemu_escape(sock)
    )
}

/// The `-netdev` value that connects the NIC backend `id` to the switch's VDE directory
/// `dir` (how NixOS start scripts join a VLAN): `vde,id=<id>,sock=<dir>`.
pub fn vde_netdev(id: &str, dir: &std::path::Path) -> String {
    format!("vde,id={id},sock={}", qemu_escape(dir))
}

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
    if let Some(dir) = &cfg.transfer_dir {
        a.extend(virtfs("xfer", TRANSFER_TAG, dir));
    }
    for (i, (tag, dir)) in cfg.shared_dirs.iter().enumerate() {
        a.extend(virtfs(&format!("sd{i}"), tag, dir));
    }
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
    use std::path::Path;

    #[test]
    fn netdev_values_escape_commas() {
        assert_eq!(
            stream_netdev("vlan1", Path::new("/run/a,b/x.sock")),
            "stream,id=vlan1,server=off,addr.type=unix,addr.path=/run/a,,b/x.sock"
        );
        assert_eq!(
            vde_netdev("vlan2", Path::new("/run/a,b/vde")),
            "vde,id=vlan2,sock=/run/a,,b/vde"
        );
    }

    fn config() -> VmConfig {
        VmConfig {
            name: "server".into(),
            accel: Accel::Tcg,
            memory_mib: 1024,
            cpus: 2,
            kernel: "/store/k/vmlinuz".into(),
            initrd: "/run/server/initrd".into(),
            disk: "/run/server/disk,1.qcow2".into(),
            modules_disk: Some("/store/k/modules.img".into()),
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
            transfer_dir: None,
            shared_dirs: Vec::new(),
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
        let expected = "-name server -nodefaults -no-user-config -machine q35 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 -bios /usr/share/qemu/qboot.rom -kernel /store/k/vmlinuz -initrd /run/server/initrd -append console=ttyS0 panic=1 loglevel=7 net.ifnames=0 biosdevname=0 mitigations=off tsc=reliable no_timer_check random.trust_cpu=on 8250.nr_uarts=1 systemd.show_status=false cryptomgr.notests vmrig.modules=LABEL=vmrig-modules foo=bar -drive file=/run/server/disk,,1.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap -drive file=/store/k/modules.img,if=none,id=modules,format=raw,readonly=on -device virtio-blk-pci,drive=modules,addr=0xf -vga none -display none -netdev user,id=user0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80 -device virtio-net-pci,netdev=user0,addr=0x10,mac=52:54:00:12:34:56 -netdev stream,id=vlan1,server=off,addr.type=unix,addr.path=/run/vlan1/server.sock -device virtio-net-pci,netdev=vlan1,addr=0x11,mac=52:54:00:12:01:02 -no-reboot -serial stdio -device virtio-serial-pci -chardev socket,id=shell,path=/run/server/shell -device virtconsole,chardev=shell -chardev socket,id=qmp,path=/run/server/qmp -mon chardev=qmp,mode=control -device virtio-rng-pci";
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

    /// QEMU's `kind,key=value,...` option syntax split into its parts, `,,` read as a comma.
    fn qemu_opts(value: &str) -> Vec<String> {
        let mut parts = vec![String::new()];
        let mut chars = value.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                ',' if chars.peek() == Some(&',') => {
                    chars.next();
                    parts.last_mut().unwrap().push(',');
                }
                ',' => parts.push(String::new()),
                c => parts.last_mut().unwrap().push(c),
            }
        }
        parts
    }

    /// `key=value` options as (key, value) pairs, in order (repeats kept: QEMU's last wins).
    fn key_values(parts: &[String]) -> Vec<(&str, &str)> {
        parts
            .iter()
            .map(|p| {
                p.split_once('=')
                    .unwrap_or_else(|| panic!("option `{p}` without a value"))
            })
            .collect()
    }

    /// How the VLAN NICs must reach vmrig's switch.
    enum VlanBackend<'a> {
        /// `-netdev stream` to the VLAN's unix socket (vmrig's own command line).
        Stream(&'a [VlanNic]),
        /// `-netdev vde` at the directory the driver named in `QEMU_VDE_SOCKET_<n>` (start
        /// scripts): (VLAN, that directory).
        Vde(&'a [(u8, String)]),
    }

    /// Asserts that the QEMU command line `argv` lets the guest reach nothing but its VLANs
    /// (through `vlans`) and restricted user networking with exactly `forwards` host
    /// forwards, each listening on 127.0.0.1 only.
    fn assert_hermetic(argv: &[String], vlans: &VlanBackend, forwards: usize) {
        let line = argv.join(" ");
        // Without these QEMU adds a default NIC (user networking with a route out) or reads
        // config files that may declare netdevs.
        assert!(argv.iter().any(|a| a == "-nodefaults"), "{line}");
        assert!(argv.iter().any(|a| a == "-no-user-config"), "{line}");
        let flag = |a: &str| {
            a.strip_prefix('-')
                .map(|f| f.trim_start_matches('-').to_owned())
        };
        let mut netdev_ids = Vec::new();
        let mut nic_netdevs = Vec::new();
        let mut vlans_seen = Vec::new();
        let mut hostfwds = 0;
        for (i, arg) in argv.iter().enumerate() {
            let Some(flag) = flag(arg) else { continue };
            let value = argv.get(i + 1).map(String::as_str).unwrap_or("");
            match flag.as_str() {
                // Legacy and shorthand networking, and config files, each of which can
                // make a backend that the -netdev checks below would not see.
                "net" | "nic" | "redir" | "tftp" | "bootp" | "smb" | "readconfig" => {
                    panic!("`{arg}` gives the guest a network path: {line}")
                }
                "netdev" => {
                    let parts = qemu_opts(value);
                    let options = key_values(&parts[1..]);
                    let ids: Vec<&str> = options
                        .iter()
                        .filter(|(k, _)| *k == "id")
                        .map(|(_, v)| *v)
                        .collect();
                    assert_eq!(ids.len(), 1, "one id: {value}");
                    netdev_ids.push(ids[0].to_owned());
                    let keys: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
                    match (parts[0].as_str(), vlans) {
                        ("user", _) => {
                            // An allowlist: guestfwd, smb, tftp, bootfile, net, host, dns,
                            // ipv6 and every other option is a failure.
                            for key in &keys {
                                assert!(
                                    ["id", "restrict", "hostfwd"].contains(key),
                                    "user networking option `{key}`: {value}"
                                );
                            }
                            let restrict: Vec<&str> = options
                                .iter()
                                .filter(|(k, _)| *k == "restrict")
                                .map(|(_, v)| *v)
                                .collect();
                            assert_eq!(restrict, ["on"], "{value}");
                            for (_, fwd) in options.iter().filter(|(k, _)| *k == "hostfwd") {
                                assert!(
                                    fwd.starts_with("tcp:127.0.0.1:")
                                        && fwd.matches(':').count() == 3,
                                    "hostfwd not on 127.0.0.1 only: {fwd}"
                                );
                                hostfwds += 1;
                            }
                        }
                        ("stream", VlanBackend::Stream(nics)) => {
                            for key in &keys {
                                assert!(
                                    ["id", "server", "addr.type", "addr.path"].contains(key),
                                    "stream option `{key}`: {value}"
                                );
                            }
                            let get = |key: &str| {
                                options.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
                            };
                            assert_eq!(get("server"), Some("off"), "{value}");
                            assert_eq!(get("addr.type"), Some("unix"), "{value}");
                            let nic = nics
                                .iter()
                                .find(|n| vlan_netdev_id(n.vlan) == ids[0])
                                .unwrap_or_else(|| panic!("a netdev of no VLAN: {value}"));
                            assert_eq!(
                                get("addr.path"),
                                Some(nic.socket.to_str().unwrap()),
                                "VLAN {} is not on its switch socket",
                                nic.vlan
                            );
                            vlans_seen.push(nic.vlan);
                        }
                        ("vde", VlanBackend::Vde(sockets)) => {
                            for key in &keys {
                                assert!(
                                    ["id", "sock"].contains(key),
                                    "vde option `{key}`: {value}"
                                );
                            }
                            let (vlan, dir) = sockets
                                .iter()
                                .find(|(n, _)| vlan_netdev_id(*n) == ids[0])
                                .unwrap_or_else(|| panic!("a netdev of no VLAN: {value}"));
                            let sock: Vec<&str> = options
                                .iter()
                                .filter(|(k, _)| *k == "sock")
                                .map(|(_, v)| *v)
                                .collect();
                            assert_eq!(
                                sock,
                                [dir.as_str()],
                                "VLAN {vlan} is not on the switch named by QEMU_VDE_SOCKET_{vlan}"
                            );
                            vlans_seen.push(*vlan);
                        }
                        // tap, bridge, socket (udp, mcast, tcp), l2tpv3, dgram, vhost-user,
                        // netmap, vmnet-*, af-xdp, a stream or vde where the other is
                        // expected, ...
                        (kind, _) => panic!("netdev `{kind}` is not allowed: {value}"),
                    }
                }
                "device" => {
                    for (k, v) in key_values(&qemu_opts(value)[1..]) {
                        if k == "netdev" {
                            nic_netdevs.push(v.to_owned());
                        }
                    }
                }
                // Host-side channels of the driver: unix sockets only, never TCP/UDP.
                "chardev" => {
                    let parts = qemu_opts(value);
                    assert_eq!(parts[0], "socket", "{value}");
                    let keys: Vec<&str> = key_values(&parts[1..]).iter().map(|(k, _)| *k).collect();
                    assert!(keys.contains(&"path"), "{value}");
                    assert!(
                        !keys.contains(&"host") && !keys.contains(&"port"),
                        "{value}"
                    );
                }
                "serial" | "monitor" | "qmp" => assert!(
                    value == "stdio" || value.starts_with("unix:"),
                    "-{flag} {value}"
                ),
                _ => {}
            }
        }
        let mut expected: Vec<u8> = match vlans {
            VlanBackend::Stream(nics) => nics.iter().map(|n| n.vlan).collect(),
            VlanBackend::Vde(sockets) => sockets.iter().map(|(n, _)| *n).collect(),
        };
        expected.sort_unstable();
        vlans_seen.sort_unstable();
        assert_eq!(vlans_seen, expected, "one netdev per VLAN: {line}");
        assert_eq!(hostfwds, forwards, "host forwards: {line}");
        netdev_ids.sort();
        nic_netdevs.sort();
        assert_eq!(
            netdev_ids, nic_netdevs,
            "every NIC on a checked netdev: {line}"
        );
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn guests_are_hermetic_only_vlans_and_restricted_user_networking() {
        let mut cfg = config();
        cfg.vlans.push(VlanNic {
            vlan: 7,
            mac: "52:54:00:12:07:02".into(),
            socket: "/run/vlan7,x/server.sock".into(),
        });
        assert_hermetic(
            &strings(qemu_args(&cfg)),
            &VlanBackend::Stream(&cfg.vlans),
            1,
        );
        // No forwards configured: no hostfwd at all.
        cfg.forwards.clear();
        assert_hermetic(
            &strings(qemu_args(&cfg)),
            &VlanBackend::Stream(&cfg.vlans),
            0,
        );
        // Every other switch: KVM, graphics, reboots, a restored state, no VLAN at all.
        cfg.accel = Accel::Kvm;
        cfg.graphics = true;
        cfg.allow_reboot = true;
        cfg.incoming = Some("/store/s/state".into());
        cfg.forwards = vec![(8080, 80), (2222, 22)];
        assert_hermetic(
            &strings(qemu_args(&cfg)),
            &VlanBackend::Stream(&cfg.vlans),
            2,
        );
        cfg.vlans.clear();
        assert_hermetic(&strings(qemu_args(&cfg)), &VlanBackend::Stream(&[]), 2);

        // The checker itself catches the holes it is about.
        let base = strings(qemu_args(&config()));
        for (from, to) in [
            ("restrict=on", "restrict=off"),
            (
                "restrict=on",
                "restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:nc x 80",
            ),
            ("restrict=on", "restrict=on,smb=/srv"),
            ("restrict=on", "restrict=on,tftp=/srv,bootfile=x"),
            ("tcp:127.0.0.1:8080", "tcp::8080"),
            ("stream,", "socket,mcast=230.0.0.1:1234,"),
            ("addr.type=unix", "addr.type=inet"),
            ("addr.path=/run/vlan1/server.sock", "addr.path=/elsewhere"),
        ] {
            let holed: Vec<String> = base.iter().map(|a| a.replacen(from, to, 1)).collect();
            let caught = std::panic::catch_unwind(|| {
                assert_hermetic(&holed, &VlanBackend::Stream(&config().vlans), 1)
            });
            assert!(caught.is_err(), "not caught: {to}");
        }
        for extra in [
            ["-netdev", "tap,id=t0,ifname=tap0"],
            ["-netdev", "bridge,id=b0,br=br0"],
            ["-netdev", "l2tpv3,id=l0,src=1.2.3.4,dst=5.6.7.8"],
            ["-net", "nic"],
            ["-nic", "user"],
            ["-chardev", "socket,id=c,host=0.0.0.0,port=99"],
            ["-serial", "tcp:1.2.3.4:99"],
        ] {
            let mut holed = base.clone();
            holed.extend(extra.map(String::from));
            let caught = std::panic::catch_unwind(|| {
                assert_hermetic(&holed, &VlanBackend::Stream(&config().vlans), 1)
            });
            assert!(caught.is_err(), "not caught: {extra:?}");
        }
    }

    /// The same for a NixOS start script: bash expands it (a fake QEMU prints its argv),
    /// with the NixOS driver's own options after it. The VLAN NICs are `vde` at exactly
    /// the directories in `QEMU_VDE_SOCKET_<n>` (the driver points them at vmrig's switch:
    /// `MachineCreator::new`), and eth0 is the same restricted user networking.
    #[test]
    fn guests_are_hermetic_in_start_scripts_too() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, fake_img) = crate::start_script::fake_qemu(dir.path());
        let mut cfg = config();
        cfg.forwards.clear();
        cfg.vlans.push(VlanNic {
            vlan: 2,
            mac: "52:54:00:12:02:02".into(),
            socket: "/ignored".into(),
        });
        let text = crate::start_script::render(&crate::start_script::StartScript {
            cfg: &cfg,
            root_image: std::path::Path::new("/store/r/root.img"),
            qemu: &fake,
            qemu_img: &fake_img,
            origin: "a test",
        });
        let script = dir.path().join("run-server-vm");
        std::fs::write(&script, text).unwrap();
        let vde: Vec<(u8, String)> = [1, 2]
            .map(|n| (n, format!("/tmp/vmrig-run-1-x/vlan{n}/vde")))
            .into();
        let sockets = NixosSockets {
            qmp: dir.path().join("qmp"),
            monitor: dir.path().join("monitor"),
            shell: dir.path().join("shell"),
        };
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(&script)
            .args(nixos_driver_args(&sockets, false, true))
            .current_dir(dir.path())
            .env("TMPDIR", dir.path())
            .env("USE_TMPDIR", "1")
            // What a user may add on purpose (NixOS's own knobs) is not vmrig's to check.
            .env_remove("QEMU_OPTS")
            .env_remove("QEMU_NET_OPTS");
        for (n, path) in &vde {
            cmd.env(format!("QEMU_VDE_SOCKET_{n}"), path);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let argv: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_hermetic(&argv, &VlanBackend::Vde(&vde), 0);
    }
}
