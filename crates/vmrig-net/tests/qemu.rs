//! End to end with a real QEMU (skipped when `qemu-system-x86_64` is missing): two VMs without
//! any OS network-boot with iPXE, whose DHCP requests must cross the switch; over stream
//! sockets, and with one of them joining as a VDE client (`-netdev vde`, libvdeplug).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrig_net::pcap::read_pcap;
use vmrig_net::Vlan;
use vmrig_vm::cmdline::{stream_netdev, vde_netdev};

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(sock: &Path, mac: &str) -> Option<Qemu> {
    qemu_with(&stream_netdev("vlan1", sock), mac)
}

fn qemu_with(netdev: &str, mac: &str) -> Option<Qemu> {
    Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-M",
            "pc",
            "-display",
            "none",
            "-m",
            "64",
            "-boot",
            "n",
        ])
        .args(["-netdev", netdev])
        .args(["-device", &format!("virtio-net-pci,netdev=vlan1,mac={mac}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()
        .map(Qemu)
}

fn have_qemu() -> bool {
    vmrig_testkit::require_program("qemu-system-x86_64")
}

/// Whether this QEMU was built with `-netdev vde` (it needs libvdeplug).
fn have_qemu_vde() -> bool {
    if !have_qemu() {
        return false;
    }
    let out = Command::new("qemu-system-x86_64")
        .args(["-netdev", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !out.lines().any(|l| l.trim() == "vde") {
        vmrig_testkit::cannot_run(
            "qemu-system-x86_64 has no vde netdev (built without libvdeplug)",
        );
        return false;
    }
    true
}

#[test]
fn two_pxe_booting_qemus_exchange_frames() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    let pcap = dir.path().join("vlan1.pcap");
    vlan.capture(&pcap).unwrap();
    let sa = vlan.add_port("a").unwrap();
    let sb = vlan.add_port("b").unwrap();
    let _a = qemu(&sa, "52:54:00:12:01:01").expect("spawn qemu");
    let _b = qemu(&sb, "52:54:00:12:01:02").expect("spawn qemu");
    assert!(
        vlan.wait_connected("a", 1, Duration::from_secs(20)),
        "qemu a did not connect"
    );
    assert!(
        vlan.wait_connected("b", 1, Duration::from_secs(20)),
        "qemu b did not connect"
    );

    // iPXE sends DHCP discovers (broadcast) from each VM; each must reach the other.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = vlan.stats();
        let (a, b) = (&s.ports["a"], &s.ports["b"]);
        if a.frames_in > 0 && b.frames_in > 0 && a.frames_out > 0 && b.frames_out > 0 {
            assert_eq!(
                a.malformed + b.malformed + a.protocol_errors + b.protocol_errors,
                0
            );
            break;
        }
        assert!(Instant::now() < deadline, "no frames from QEMU: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    vlan.stop_capture().unwrap();
    let (_, frames) = read_pcap(&std::fs::read(&pcap).unwrap()).unwrap();
    let from = |m: u8| {
        frames
            .iter()
            .any(|f| f[6..12] == [0x52, 0x54, 0, 0x12, 1, m] && f[12..14] == [0x08, 0x00])
    };
    assert!(
        from(1) && from(2),
        "IPv4 (DHCP) frames from both VMs in the capture"
    );
}

/// The NixOS way: QEMU started with `-netdev vde,sock=<dir>` joins the VLAN through its own
/// libvdeplug, and its DHCP discovers reach a QEMU on a stream port and back.
#[test]
fn qemu_over_vde_and_qemu_over_stream_exchange_frames() {
    if !have_qemu_vde() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    let pcap = dir.path().join("vlan1.pcap");
    vlan.capture(&pcap).unwrap();
    let vde = vlan.vde_dir().unwrap();
    let sb = vlan.add_port("b").unwrap();
    let t0 = Instant::now();
    let a = qemu_with(&vde_netdev("vlan1", &vde), "52:54:00:12:01:01").expect("spawn");
    vlan.name_vde_client(a.0.id(), "a").unwrap();
    let _b = qemu(&sb, "52:54:00:12:01:02").expect("spawn qemu");
    assert!(
        vlan.wait_connected("a", 1, Duration::from_secs(20)),
        "qemu a did not join over VDE: {:?}",
        vlan.stats()
    );
    eprintln!("QEMU joined over VDE {:?} after spawn", t0.elapsed());
    assert!(vlan.wait_connected("b", 1, Duration::from_secs(20)));
    let descr = vlan.stats().ports["a"].vde_description.clone().unwrap();
    assert!(
        descr.starts_with("QEMU user=")
            && descr
                .to_ascii_lowercase()
                .contains(&format!("pid={}", a.0.id())),
        "{descr}"
    );

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = vlan.stats();
        let (pa, pb) = (&s.ports["a"], &s.ports["b"]);
        if pa.frames_in > 0 && pb.frames_in > 0 && pa.frames_out > 0 && pb.frames_out > 0 {
            assert_eq!(pa.malformed + pb.malformed + pb.protocol_errors, 0);
            assert_eq!(s.vde_rejected, 0);
            break;
        }
        assert!(Instant::now() < deadline, "no frames from QEMU: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("first frames both ways {:?} after spawn", t0.elapsed());
    vlan.stop_capture().unwrap();
    let (_, frames) = read_pcap(&std::fs::read(&pcap).unwrap()).unwrap();
    let from = |m: u8| {
        frames
            .iter()
            .any(|f| f[6..12] == [0x52, 0x54, 0, 0x12, 1, m] && f[12..14] == [0x08, 0x00])
    };
    assert!(from(1) && from(2), "IPv4 (DHCP) frames from both VMs");

    // QEMU exits: its port goes away.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while vlan.stats().ports.contains_key("a") {
        assert!(Instant::now() < deadline, "port a outlived its QEMU");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `-netdev vde,port=N`: vdeplug4 first tries a socket `<dir>/N`, then `ctl` with the number in
/// the request; the switch takes it as any other client.
#[test]
fn qemu_vde_with_a_port_number_joins() {
    if !have_qemu_vde() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    let vde = vlan.vde_dir().unwrap();
    let netdev = format!("{},port=3", vde_netdev("vlan1", &vde));
    let _q = qemu_with(&netdev, "52:54:00:12:01:03").expect("spawn qemu");
    assert!(
        vlan.wait_connected("vde1", 1, Duration::from_secs(20)),
        "{:?}",
        vlan.stats()
    );
}
