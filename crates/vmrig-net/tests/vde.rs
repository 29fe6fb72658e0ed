//! VDE ports with fake libvdeplug clients: handshake, frames to and from stream ports and other
//! VDE ports, the fault policy, naming, removal, bad clients, clean-up.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use vmrig_net::pcap::read_pcap;
use vmrig_net::{NetError, Vlan};

fn setup(stream_ports: &[&str]) -> (tempfile::TempDir, Vlan, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    for n in stream_ports {
        vlan.add_port(n).unwrap();
    }
    let vde = vlan.vde_dir().unwrap();
    (dir, vlan, vde)
}

/// Join anonymously and wait for the port `vde<k>` to be there.
fn join(vlan: &Vlan, vde: &std::path::Path, name: &str) -> FakeVde {
    let c = FakeVde::join(vde);
    assert!(
        vlan.wait_connected(name, 1, T),
        "no port {name}: {:#?}",
        vlan.stats()
    );
    c
}

#[test]
fn vde_dir_layout_and_idempotence() {
    let (d, vlan, vde) = setup(&[]);
    assert_eq!(vde, d.path().join("vlan1").join("vde"));
    assert!(vde.join("ctl").exists());
    assert_eq!(vlan.vde_dir().unwrap(), vde, "second call: same dir");
    // A run directory that leaves no room for libvdeplug's `<dir>/.<pid>-<n>`.
    let long = d.path().join("x".repeat(80));
    let v2 = Vlan::start(2, &long).unwrap();
    assert!(matches!(v2.vde_dir(), Err(NetError::PathTooLong(_))));
}

#[test]
fn vde_client_and_stream_port_exchange_frames() {
    let (_d, vlan, vde) = setup(&["a"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let v = join(&vlan, &vde, "vde1");

    // Broadcast from the VDE client reaches the stream port, and vice versa.
    let f = eth(BCAST, mac(2), b"from vde");
    v.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    let f = eth(BCAST, mac(1), b"from stream");
    a.send(&f);
    assert_eq!(v.recv(T).unwrap(), f);
    // Both learned: unicast both ways.
    let f = eth(mac(2), mac(1), b"unicast to vde");
    a.send(&f);
    assert_eq!(v.recv(T).unwrap(), f);
    let f = eth(mac(1), mac(2), b"unicast to stream");
    v.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    v.expect_silence("no echo to the sender");
    // A maximal Ethernet frame and a jumbo one go through as single datagrams.
    for len in [1514, 9000] {
        let f = eth(mac(1), mac(2), &vec![0x5a; len - 14]);
        v.send(&f);
        assert_eq!(a.recv(T).unwrap(), f);
        let f = eth(mac(2), mac(1), &vec![0xa5; len - 14]);
        a.send(&f);
        assert_eq!(v.recv(T).unwrap(), f);
    }

    let s = vlan.stats();
    let p = &s.ports["vde1"];
    assert!(p.connected && p.link_up);
    assert_eq!(p.connections, 1);
    assert_eq!((p.frames_in, p.frames_out), (4, 4));
    let descr = p.vde_description.as_deref().unwrap();
    assert!(descr.starts_with("QEMU user=tester PID="), "{descr}");
    assert_eq!(s.mac_entries, 2);
    assert_eq!(s.vde_rejected, 0);
    // The switch's data socket is in the VDE directory; socket_path names it.
    assert_eq!(vlan.socket_path("vde1"), Some(v.switch_path.clone()));
    assert_eq!(
        v.switch_path.parent(),
        Some(vde.canonicalize().unwrap().as_path())
    );
}

#[test]
fn two_vde_clients_learn_and_flood_like_stream_ports() {
    let (_d, vlan, vde) = setup(&["s"]);
    let mut s = FakeQemu::join(&vlan, "s", 1);
    let v1 = join(&vlan, &vde, "vde1");
    let v2 = join(&vlan, &vde, "vde2");

    // Unknown unicast from v1 floods to v2 and s.
    let f = eth(mac(2), mac(1), b"who is 2");
    v1.send(&f);
    assert_eq!(v2.recv(T).unwrap(), f);
    assert_eq!(s.recv(T).unwrap(), f);
    // v2 answers: unicast, s sees nothing.
    let f = eth(mac(1), mac(2), b"me");
    v2.send(&f);
    assert_eq!(v1.recv(T).unwrap(), f);
    s.expect_silence("unicast between the VDE ports");
    let f = eth(mac(2), mac(1), b"thanks");
    v1.send(&f);
    assert_eq!(v2.recv(T).unwrap(), f);
    s.expect_silence("unicast between the VDE ports");
    // Runts and a too-large datagram are dropped and counted, the port stays.
    v1.send(&[]);
    v1.send(&[0xff; 13]);
    v1.send(&vec![0xff; vmrig_net::frame::MAX_FRAME + 1]);
    let f = eth(BCAST, mac(1), b"still here");
    v1.send(&f);
    assert_eq!(v2.recv(T).unwrap(), f);
    assert_eq!(s.recv(T).unwrap(), f);
    let st = vlan.stats();
    assert_eq!(st.ports["vde1"].malformed, 3);
    assert_eq!(st.ports["vde1"].dropped_in, 3);
    assert!(st.ports["vde1"].connected);
}

#[test]
fn closing_ctl_removes_the_port_and_its_sockets() {
    let (_d, vlan, vde) = setup(&["a"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let v = join(&vlan, &vde, "vde1");
    v.send(&eth(BCAST, mac(2), b"hello"));
    a.recv(T).unwrap();
    assert_eq!(vlan.stats().mac_entries, 1);
    let data_sock = v.switch_path.clone();
    assert!(data_sock.exists());

    drop(v);
    wait_stats(&vlan, "port removed", |s| !s.ports.contains_key("vde1"));
    let s = vlan.stats();
    assert_eq!(s.mac_entries, 0, "its MACs are forgotten");
    assert!(!data_sock.exists(), "its data socket is removed");
    assert!(matches!(
        vlan.set_link("vde1", false),
        Err(NetError::UnknownPort { .. })
    ));
    // Traffic to its old MAC floods (to nobody) without trouble; a new client gets a new name.
    a.send(&eth(mac(2), mac(1), b"into the void"));
    let v = join(&vlan, &vde, "vde2");
    let f = eth(BCAST, mac(1), b"welcome");
    a.send(&f);
    assert_eq!(v.recv(T).unwrap(), f);
}

#[test]
fn fault_policy_applies_to_vde_ports() {
    let (d, vlan, vde) = setup(&["a"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let v = FakeVde::join_as(&vde, "b", 1);
    let w = FakeVde::join_as(&vde, "c", 2);
    assert!(vlan.wait_connected("b", 1, T) && vlan.wait_connected("c", 1, T));
    let pcap = d.path().join("cap.pcap");
    vlan.capture(&pcap).unwrap();
    // Learn everyone.
    a.send(&eth(BCAST, mac(1), b"a"));
    v.recv(T).unwrap();
    w.recv(T).unwrap();
    v.send(&eth(BCAST, mac(2), b"b"));
    a.recv(T).unwrap();
    w.recv(T).unwrap();
    w.send(&eth(BCAST, mac(3), b"c"));
    a.recv(T).unwrap();
    v.recv(T).unwrap();

    // Link down on a VDE port: nothing in or out.
    vlan.set_link("b", false).unwrap();
    a.send(&eth(mac(2), mac(1), b"to b"));
    v.send(&eth(mac(1), mac(2), b"from b"));
    v.expect_silence("b is down");
    a.expect_silence("b is down");
    assert!(!vlan.stats().ports["b"].link_up);
    vlan.set_link("b", true).unwrap();

    // Partition by name between a VDE port and a stream port.
    vlan.partition(&["a"], &["c"]).unwrap();
    w.send(&eth(mac(1), mac(3), b"c->a"));
    a.expect_silence("partitioned");
    let f = eth(mac(2), mac(3), b"c->b");
    w.send(&f);
    assert_eq!(v.recv(T).unwrap(), f, "same side of no partition");
    vlan.heal().unwrap();

    // Delay.
    vlan.set_delay(Duration::from_millis(150)).unwrap();
    let t0 = Instant::now();
    let f = eth(mac(1), mac(2), b"late");
    v.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    assert!(t0.elapsed() >= Duration::from_millis(150));
    vlan.set_delay(Duration::ZERO).unwrap();

    // Loss.
    vlan.set_loss(100.0).unwrap();
    v.send(&eth(mac(1), mac(2), b"lost"));
    a.expect_silence("100% loss");
    vlan.set_loss(0.0).unwrap();

    // Everything accepted from the VDE ports is in the capture.
    let n = vlan.stop_capture().unwrap();
    let (_, frames) = read_pcap(&std::fs::read(&pcap).unwrap()).unwrap();
    assert_eq!(frames.len() as u64, n);
    assert!(frames.iter().any(|f| &f[14..] == b"late"));
    assert!(frames.iter().any(|f| &f[14..] == b"c->a"));
}

#[test]
fn naming_by_description_pid_and_restart() {
    let (_d, vlan, vde) = setup(&["taken"]);

    // The description's label names the port, unless it is QEMU's or already taken.
    let n1 = FakeVde::join_as(&vde, "node1", 100);
    assert!(vlan.wait_connected("node1", 1, T));
    let _t = FakeVde::join_as(&vde, "taken", 101);
    let _q = FakeVde::join_as(&vde, "QEMU", 102);
    let _bad = FakeVde::join_as(&vde, ".hidden", 103);
    wait_stats(&vlan, "four VDE ports", |s| s.ports.len() == 5);
    let names: Vec<String> = vlan.stats().ports.keys().cloned().collect();
    assert_eq!(names, ["node1", "taken", "vde2", "vde3", "vde4"]);
    assert!(matches!(
        vlan.add_port("node1"),
        Err(NetError::NameTaken { .. })
    ));

    // A pid registered before the client connects names its port...
    vlan.name_vde_client(200, "m1").unwrap();
    let _m1 = FakeVde::join_as(&vde, "QEMU", 200);
    assert!(vlan.wait_connected("m1", 1, T));
    // ...and one registered after renames it.
    let _m2 = FakeVde::join_as(&vde, "QEMU", 201);
    assert!(vlan.wait_connected("vde6", 1, T));
    vlan.name_vde_client(201, "m2").unwrap();
    let s = vlan.stats();
    assert!(s.ports.contains_key("m2") && !s.ports.contains_key("vde6"));
    // Renaming onto a name in use fails and leaves the port alone.
    let _m3 = FakeVde::join_as(&vde, "QEMU", 202);
    assert!(vlan.wait_connected("vde7", 1, T));
    assert!(matches!(
        vlan.name_vde_client(202, "taken"),
        Err(NetError::NameTaken { .. })
    ));
    assert!(vlan.name_vde_client(1, "a/b").is_err());

    // A named port's client comes back (QEMU restarted): link state and count carry over.
    vlan.set_link("node1", false).unwrap();
    drop(n1);
    wait_stats(&vlan, "node1 gone", |s| !s.ports.contains_key("node1"));
    let n1 = FakeVde::join_as(&vde, "node1", 300);
    assert!(vlan.wait_connected("node1", 2, T));
    let p = &vlan.stats().ports["node1"];
    assert_eq!(p.connections, 2);
    assert!(!p.link_up, "still blocked after the restart");
    drop(n1);
}

#[test]
fn port_number_requests_are_accepted() {
    let (_d, vlan, vde) = setup(&[]);
    // `-netdev vde,port=5`: REQ_NEW_CONTROL + (5 << 8); and REQ_NEW_PORT0.
    for (i, kind) in [5u32 << 8, 1].into_iter().enumerate() {
        let own = FakeVde::own_path(&vde);
        let req = vde_request(3, kind, &own, "QEMU user=t PID=1");
        let c = FakeVde::handshake(&vde, &own, &req, true).unwrap();
        assert!(vlan.wait_connected(&format!("vde{}", i + 1), 1, T));
        drop(c);
    }
}

#[test]
fn bad_clients_are_turned_away_with_a_reason() {
    let (_d, vlan, vde) = setup(&["a"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let try_req = |version: u32, kind: u32| {
        let own = FakeVde::own_path(&vde);
        let req = vde_request(version, kind, &own, "QEMU user=t PID=1");
        let r = FakeVde::handshake(&vde, &own, &req, true);
        let _ = std::fs::remove_file(&own);
        r
    };
    let expect = |n: u64, needle: &str| {
        wait_stats(&vlan, needle, |s| s.vde_rejected == n);
        let e = vlan.stats().vde_error.unwrap();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    };

    assert!(try_req(2, 0).is_err());
    expect(1, "version 2 is not supported");
    assert!(try_req(1, 0).is_err());
    expect(2, "version 1");
    assert!(try_req(3, 7).is_err());
    expect(3, "unknown VDE request type 7");

    // Wrong magic, then the client waits: answered at once, not after a timeout.
    let mut c = UnixStream::connect(vde.join("ctl")).unwrap();
    c.write_all(&[0xde, 0xad, 0xbe, 0xef, 3, 0, 0, 0]).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let t0 = Instant::now();
    assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0, "closed by the switch");
    assert!(t0.elapsed() < Duration::from_secs(2));
    expect(4, "magic");

    // A client socket that does not exist.
    let ghost = vde.join(".ghost");
    let req = vde_request(3, 0, &ghost, "QEMU");
    let mut c = UnixStream::connect(vde.join("ctl")).unwrap();
    c.write_all(&req).unwrap();
    assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0);
    expect(5, "cannot connect to the VDE client's socket");

    // A client socket naming the switch's own ctl.
    let req = vde_request(3, 0, &vde.canonicalize().unwrap().join("ctl"), "QEMU");
    let mut c = UnixStream::connect(vde.join("ctl")).unwrap();
    c.write_all(&req).unwrap();
    assert_eq!(c.read(&mut [0u8; 16]).unwrap(), 0);
    expect(6, "switch's own");

    // Half a request, then hang up.
    let mut c = UnixStream::connect(vde.join("ctl")).unwrap();
    c.write_all(&req[..50]).unwrap();
    drop(c);
    expect(7, "before a complete request");

    // None of it disturbed the switch.
    let v = join(&vlan, &vde, "vde1");
    let f = eth(BCAST, mac(2), b"fine");
    v.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    assert_eq!(vlan.stats().ports.len(), 2);
}

#[test]
fn a_vde_client_that_does_not_read_does_not_stall_others() {
    let (_d, vlan, vde) = setup(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let _sleepy = join(&vlan, &vde, "vde1");
    let big = eth(BCAST, mac(1), &[0u8; 1500]);
    for _ in 0..10 {
        for _ in 0..500 {
            a.send(&big);
        }
        for _ in 0..500 {
            assert_eq!(b.recv(T).unwrap(), big, "b must get every frame");
        }
    }
    let s = vlan.stats();
    assert!(s.ports["vde1"].dropped_out > 0, "{:?}", s.ports["vde1"]);
    assert!(s.ports["vde1"].queued_bytes > 0);
}

#[test]
fn drop_removes_the_vde_directory() {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(3, dir.path()).unwrap();
    let vde = vlan.vde_dir().unwrap();
    // One client like vdeplug4 (unlinks its socket), one like vde2 (keeps it until close).
    let c1 = FakeVde::join(&vde);
    let own = FakeVde::own_path(&vde);
    let req = vde_request(3, 0, &own, "QEMU user=t PID=2");
    let c2 = FakeVde::handshake(&vde, &own, &req, false).unwrap();
    wait_stats(&vlan, "two ports", |s| s.ports.len() == 2);
    assert!(own.exists());
    drop(vlan);
    assert!(!vde.exists(), "vde dir removed");
    assert!(!dir.path().join("vlan3").exists());
    // The clients see their control connections end.
    for mut c in [c1, c2] {
        c.ctl.set_read_timeout(Some(T)).unwrap();
        assert_eq!(c.ctl.read(&mut [0u8; 8]).unwrap(), 0);
    }
}

#[test]
fn many_clients_come_and_go_without_leaking() {
    let (_d, vlan, vde) = setup(&[]);
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
    let before = fds();
    for round in 0..100u32 {
        let c = FakeVde::join(&vde);
        assert!(vlan.wait_connected(&format!("vde{}", round + 1), 1, T));
        drop(c);
        wait_stats(&vlan, "gone", |s| s.ports.is_empty());
    }
    // Only ctl remains in the directory.
    let left: Vec<_> = std::fs::read_dir(&vde)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["ctl"]);
    // The switch holds no descriptor per departed client (other tests run in parallel in this
    // process, so allow some slack).
    if let (Some(b), Some(a)) = (before, fds()) {
        assert!(a < b + 60, "fds {b} -> {a}");
    }
}

#[test]
fn a_client_that_closes_only_its_data_socket_loses_frames_not_the_switch() {
    let (_d, vlan, vde) = setup(&["a"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let v = join(&vlan, &vde, "vde1");
    v.send(&eth(BCAST, mac(2), b"hello"));
    a.recv(T).unwrap();
    let FakeVde { ctl, data, .. } = v;
    drop(data);
    for i in 0..20u8 {
        a.send(&eth(mac(2), mac(1), &[i]));
    }
    wait_stats(&vlan, "frames to the dead socket dropped", |s| {
        s.ports["vde1"].dropped_out == 20 && s.ports["vde1"].queued_bytes == 0
    });
    // The port lives on (its control connection is open) and the switch still switches.
    let w = join(&vlan, &vde, "vde2");
    let f = eth(BCAST, mac(1), b"alive");
    a.send(&f);
    assert_eq!(w.recv(T).unwrap(), f);
    assert!(vlan.stats().ports["vde1"].connected);
    drop(ctl);
    wait_stats(&vlan, "vde1 gone", |s| !s.ports.contains_key("vde1"));
}
