mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use vmrig_net::frame::MAX_FRAME;
use vmrig_net::pcap::{read_pcap, LINKTYPE_ETHERNET};
use vmrig_net::Vlan;

fn vlan_with(names: &[&str]) -> (tempfile::TempDir, Vlan) {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    for n in names {
        let p = vlan.add_port(n).unwrap();
        assert_eq!(p, dir.path().join("vlan1").join(format!("{n}.sock")));
        assert!(p.exists());
    }
    (dir, vlan)
}

/// Every fake port says hello (broadcast) so the switch learns its MAC; drain the floods.
fn learn_all(ports: &mut [&mut FakeQemu]) {
    let n = ports.len();
    for i in 0..n {
        ports[i].send(&eth(BCAST, mac(i as u8 + 1), b"hello"));
        for (j, p) in ports.iter_mut().enumerate() {
            if j != i {
                let f = p.recv(T).expect("flooded hello");
                assert_eq!(&f[6..12], &mac(i as u8 + 1));
            }
        }
    }
}

#[test]
fn unicast_after_learning_and_flooding() {
    let (_d, vlan) = vlan_with(&["a", "b", "c"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let mut c = FakeQemu::join(&vlan, "c", 1);

    // Unknown unicast floods.
    let f = eth(mac(2), mac(1), b"who");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    assert_eq!(c.recv(T).unwrap(), f);
    a.expect_silence("sender must not get its own frame back");

    // b answers: a is known now, so only a gets it.
    let f = eth(mac(1), mac(2), b"me");
    b.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    c.expect_silence("unicast to a known MAC must not flood");

    // And a -> b is unicast too.
    let f = eth(mac(2), mac(1), b"hi b");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    c.expect_silence("unicast to b");

    // Multicast floods.
    let f = eth([0x33, 0x33, 0, 0, 0, 1], mac(3), b"mcast");
    c.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    assert_eq!(b.recv(T).unwrap(), f);

    let s = vlan.stats();
    assert_eq!(s.ports["a"].frames_in, 2);
    assert_eq!(s.ports["a"].frames_out, 2);
    assert_eq!(s.ports["b"].frames_out, 3);
    assert_eq!(s.ports["c"].frames_out, 1);
    assert!(s.ports.values().all(|p| p.connected && p.dropped_in == 0));
    assert_eq!(s.mac_entries, 3);
}

#[test]
fn link_down_blocks_both_directions() {
    let (_d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    learn_all(&mut [&mut a, &mut b]);

    vlan.set_link("b", false).unwrap();
    a.send(&eth(mac(2), mac(1), b"to b"));
    a.send(&eth(BCAST, mac(1), b"bcast"));
    b.expect_silence("b is down: receives nothing");
    b.send(&eth(mac(1), mac(2), b"from b"));
    b.send(&eth(BCAST, mac(2), b"bcast from b"));
    a.expect_silence("b is down: sends nothing");
    let s = vlan.stats();
    assert!(!s.ports["b"].link_up);
    assert_eq!(s.ports["b"].dropped_in, 2);
    assert_eq!(s.ports["b"].dropped_out, 1, "the unicast to b");

    vlan.set_link("b", true).unwrap();
    let f = eth(mac(2), mac(1), b"again");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    let f = eth(mac(1), mac(2), b"back");
    b.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);

    assert!(vlan.set_link("nobody", false).is_err());
}

#[test]
fn partition_and_heal() {
    let (_d, vlan) = vlan_with(&["a", "b", "c"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let mut c = FakeQemu::join(&vlan, "c", 1);
    learn_all(&mut [&mut a, &mut b, &mut c]);

    vlan.partition(&["a", "b"], &["c"]).unwrap();
    // Inside a group: fine.
    let f = eth(mac(2), mac(1), b"a->b");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    // Across: nothing, both ways, unicast and broadcast.
    a.send(&eth(mac(3), mac(1), b"a->c"));
    c.send(&eth(mac(1), mac(3), b"c->a"));
    c.send(&eth(BCAST, mac(3), b"c->all"));
    c.expect_silence("partitioned c");
    a.expect_silence("partitioned a");
    b.expect_silence("partitioned b");

    vlan.heal().unwrap();
    let f = eth(mac(1), mac(3), b"healed");
    c.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
}

#[test]
fn loss_all_or_nothing() {
    let (_d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    learn_all(&mut [&mut a, &mut b]);

    vlan.set_loss(100.0).unwrap();
    for i in 0..200u8 {
        a.send(&eth(mac(2), mac(1), &[i]));
    }
    b.expect_silence("100% loss");
    assert_eq!(vlan.stats().ports["a"].dropped_in, 200);

    vlan.set_loss(0.0).unwrap();
    for i in 0..200u8 {
        a.send(&eth(mac(2), mac(1), &[i]));
    }
    for i in 0..200u8 {
        assert_eq!(b.recv(T).unwrap()[14], i, "0% loss delivers all, in order");
    }

    vlan.set_loss(50.0).unwrap();
    for i in 0..1000u16 {
        a.send(&eth(mac(2), mac(1), &i.to_be_bytes()));
    }
    let mut got = 0;
    while b.recv(Duration::from_millis(300)).is_some() {
        got += 1;
    }
    assert!((350..650).contains(&got), "50% loss delivered {got}/1000");
}

#[test]
fn delay_delays_and_keeps_order() {
    let (_d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    learn_all(&mut [&mut a, &mut b]);

    let delay = Duration::from_millis(200);
    vlan.set_delay(delay).unwrap();
    let t0 = Instant::now();
    for i in 0..50u8 {
        a.send(&eth(mac(2), mac(1), &[i]));
    }
    // Meanwhile the other direction is delayed too, but the switch keeps serving it.
    b.send(&eth(mac(1), mac(2), b"reply"));
    let first = b.recv(T).unwrap();
    assert!(t0.elapsed() >= delay, "arrived after {:?}", t0.elapsed());
    assert_eq!(first[14], 0);
    for i in 1..50u8 {
        assert_eq!(b.recv(T).unwrap()[14], i);
    }
    assert_eq!(&a.recv(T).unwrap()[14..], b"reply");
    assert!(t0.elapsed() >= delay);

    vlan.set_delay(Duration::ZERO).unwrap();
    let t1 = Instant::now();
    a.send(&eth(mac(2), mac(1), b"fast"));
    assert_eq!(&b.recv(T).unwrap()[14..], b"fast");
    assert!(t1.elapsed() < delay, "no delay any more");
}

#[test]
fn delayed_frames_respect_link_down_at_delivery() {
    let (_d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    learn_all(&mut [&mut a, &mut b]);
    vlan.set_delay(Duration::from_millis(300)).unwrap();
    a.send(&eth(mac(2), mac(1), b"late"));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vlan.stats().delayed, 1);
    vlan.set_link("b", false).unwrap();
    b.expect_silence("went down while the frame was in flight");
    std::thread::sleep(Duration::from_millis(400));
    b.expect_silence("went down while the frame was in flight");
}

#[test]
fn pcap_capture() {
    let (d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let pcap = d.path().join("vlan1.pcap");
    vlan.capture(&pcap).unwrap();
    let mut sent = Vec::new();
    for i in 0..10u8 {
        let f = eth(BCAST, mac(1), &[i; 50]);
        a.send(&f);
        assert_eq!(b.recv(T).unwrap(), f);
        sent.push(f);
    }
    let f = eth(mac(1), mac(2), &[0xee; 1500]);
    b.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    sent.push(f);
    // Readable while running (flushed after each batch, which may land just after the
    // frame reached its port: wait for it, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (lt, frames) = loop {
        let (lt, frames) = read_pcap(&std::fs::read(&pcap).unwrap()).unwrap();
        if frames.len() >= sent.len() || std::time::Instant::now() >= deadline {
            break (lt, frames);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(lt, LINKTYPE_ETHERNET);
    assert_eq!(frames, sent);
    assert_eq!(vlan.stats().captured, 11);
    assert_eq!(vlan.stop_capture().unwrap(), 11);
    a.send(&eth(BCAST, mac(1), b"not captured"));
    b.recv(T).unwrap();
    let raw = std::fs::read(&pcap).unwrap();
    assert_eq!(&raw[0..4], &0xa1b2c3d4u32.to_le_bytes());
    assert_eq!(u16::from_le_bytes([raw[4], raw[5]]), 2);
    assert_eq!(u16::from_le_bytes([raw[6], raw[7]]), 4);
    assert_eq!(u32::from_le_bytes(raw[20..24].try_into().unwrap()), 1);
    assert_eq!(read_pcap(&raw).unwrap().1.len(), 11);

    // tshark, when installed, must read it too.
    if let Ok(out) = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&pcap)
        .output()
    {
        assert!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(lines, 11);
    }
}

#[test]
fn reconnect_replaces_port_connection() {
    let (_d, vlan) = vlan_with(&["a", "b"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    learn_all(&mut [&mut a, &mut b]);

    // "QEMU of b" dies...
    drop(b);
    let deadline = Instant::now() + T;
    while vlan.stats().ports["b"].connected {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    a.send(&eth(mac(2), mac(1), b"into the void"));
    // ...and comes back on the same socket.
    let mut b = FakeQemu::join(&vlan, "b", 2);
    let f = eth(mac(2), mac(1), b"welcome back");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    let f = eth(mac(1), mac(2), b"thanks");
    b.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);

    // A second connection while the first is alive takes over (restart racing the old EOF).
    let mut b2 = FakeQemu::join(&vlan, "b", 3);
    let f = eth(mac(2), mac(1), b"to the new one");
    a.send(&f);
    assert_eq!(b2.recv(T).unwrap(), f);
    b.expect_silence("the replaced connection");
    assert_eq!(vlan.stats().ports["b"].connections, 3);
}

#[test]
fn garbage_from_a_peer_hurts_only_that_peer() {
    let (_d, vlan) = vlan_with(&["a", "b", "evil"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let mut evil = FakeQemu::join(&vlan, "evil", 1);
    learn_all(&mut [&mut a, &mut b]);

    // Short frames: dropped and counted, connection stays.
    evil.send(&[]);
    evil.send(&[1, 2, 3]);
    evil.send(&[0xff; 13]);
    let f = eth(BCAST, mac(9), b"ok after runts");
    evil.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
    assert_eq!(b.recv(T).unwrap(), f);
    let s = vlan.stats();
    assert_eq!(s.ports["evil"].malformed, 3);
    assert_eq!(s.ports["evil"].dropped_in, 3);

    // A huge length prefix: evil is cut off, the others go on.
    evil.stream
        .write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
        .unwrap();
    let _ = evil.stream.write_all(&[0u8; 1000]);
    let deadline = Instant::now() + T;
    while vlan.stats().ports["evil"].connected {
        assert!(Instant::now() < deadline, "evil not disconnected");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vlan.stats().ports["evil"].protocol_errors, 1);
    // The switch closed its end: after the floods it had queued, evil reads EOF.
    let mut n = 0;
    while evil.recv(Duration::from_millis(500)).is_some() {
        n += 1;
        assert!(n < 10);
    }

    // EOF mid-frame from another bad peer.
    let mut evil = FakeQemu::join(&vlan, "evil", 2);
    evil.stream.write_all(&1000u32.to_be_bytes()).unwrap();
    evil.stream.write_all(&[0u8; 10]).unwrap();
    drop(evil);

    // Random junk.
    let mut evil = FakeQemu::join(&vlan, "evil", 3);
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..100_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let _ = evil.stream.write_all(&junk);

    let f = eth(mac(2), mac(1), b"still fine");
    a.send(&f);
    assert_eq!(b.recv(T).unwrap(), f);
    let f = eth(mac(1), mac(2), b"still fine too");
    b.send(&f);
    assert_eq!(a.recv(T).unwrap(), f);
}

#[test]
fn a_peer_that_does_not_read_does_not_stall_others() {
    let (_d, vlan) = vlan_with(&["a", "b", "sleepy"]);
    let mut a = FakeQemu::join(&vlan, "a", 1);
    let mut b = FakeQemu::join(&vlan, "b", 1);
    let _sleepy = FakeQemu::join(&vlan, "sleepy", 1);
    learn_all(&mut [&mut a, &mut b]);
    // Floods go to sleepy as well, which never reads: its queue fills, then tail-drops, while
    // b keeps getting everything (b reads each chunk before the next is sent, so b itself never
    // lags far enough behind to overflow).
    let big = eth(BCAST, mac(1), &[0u8; 1500]);
    for _ in 0..20 {
        for _ in 0..500 {
            a.send(&big);
        }
        for _ in 0..500 {
            assert_eq!(b.recv(T).unwrap(), big, "b must get every frame");
        }
    }
    let s = vlan.stats();
    assert!(s.ports["sleepy"].dropped_out > 0);
}

#[test]
fn drop_removes_sockets_and_port_api() {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(7, dir.path()).unwrap();
    let p = vlan.add_port("m").unwrap();
    assert_eq!(vlan.add_port("m").unwrap(), p, "idempotent");
    assert!(vlan.add_port("a/b").is_err());
    assert!(vlan.add_port("").is_err());
    assert_eq!(vlan.socket_path("m"), Some(p.clone()));
    assert_eq!(vlan.socket_path("x"), None);
    let long = "x".repeat(200);
    assert!(matches!(
        vlan.add_port(&long),
        Err(vmrig_net::NetError::PathTooLong(_))
    ));
    let s = vlan.stats();
    assert_eq!(s.vlan, 7);
    assert!(!s.ports["m"].connected && s.ports["m"].link_up);
    drop(vlan);
    assert!(!p.exists());
    assert!(!dir.path().join("vlan7").exists());
}
