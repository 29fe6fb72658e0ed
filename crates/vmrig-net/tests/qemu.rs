//! End to end with a real QEMU (skipped when `qemu-system-x86_64` is missing): two VMs without
//! any OS network-boot with iPXE, whose DHCP requests must cross the switch.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrig_net::pcap::read_pcap;
use vmrig_net::{qemu_netdev_arg, Vlan};

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(sock: &Path, mac: &str) -> Option<Qemu> {
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
        .args(["-netdev", &qemu_netdev_arg("vlan1", sock)])
        .args(["-device", &format!("virtio-net-pci,netdev=vlan1,mac={mac}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()
        .map(Qemu)
}

#[test]
fn two_pxe_booting_qemus_exchange_frames() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("qemu-system-x86_64 not found: skipped");
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
