//! Throughput of one VLAN switch (one thread) between two fake QEMU ports over real unix
//! sockets: `cargo bench -p vmrig-net`. Prints frames/s and MB/s for 64- and 1500-byte frames,
//! stream port to stream port, then stream port to a VDE client and VDE client to stream port.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vmrig_net::frame::{encode_into, FrameDecoder};
use vmrig_net::Vlan;

fn eth(dst: u8, src: u8, len: usize) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0, 0x12, 1, dst, 0x52, 0x54, 0, 0x12, 1, src, 0x88, 0xb5,
    ];
    f.resize(len, 0xab);
    f
}

fn run(frame_len: usize, total: u64) {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    let sa = vlan.add_port("a").unwrap();
    let sb = vlan.add_port("b").unwrap();
    let mut a = UnixStream::connect(&sa).unwrap();
    let mut b = UnixStream::connect(&sb).unwrap();
    assert!(vlan.wait_connected("a", 1, Duration::from_secs(5)));
    assert!(vlan.wait_connected("b", 1, Duration::from_secs(5)));
    // Teach the switch both MACs so the run is pure unicast a -> b.
    let mut hello = Vec::new();
    encode_into(&mut hello, &eth(0xff, 2, 60));
    b.write_all(&hello).unwrap();
    let mut d = FrameDecoder::new();
    loop {
        let n = a.read(d.spare()).unwrap();
        d.commit(n);
        if d.next_frame().unwrap().is_some() {
            break;
        }
    }

    let frame = eth(2, 1, frame_len);
    let batch_frames = (256 * 1024 / (frame_len + 4)).max(1);
    let mut batch = Vec::new();
    for _ in 0..batch_frames {
        encode_into(&mut batch, &frame);
    }
    let batches = total / batch_frames as u64;
    let sent = batches * batch_frames as u64;

    let receiver = std::thread::spawn(move || {
        let mut dec = FrameDecoder::new();
        let mut got = 0u64;
        b.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut last = Instant::now();
        while got < sent {
            match b.read(dec.spare()) {
                Ok(0) => break,
                Ok(n) => {
                    dec.commit(n);
                    while dec.next_frame().unwrap().is_some() {
                        got += 1;
                    }
                    last = Instant::now();
                }
                Err(_) => break, // timed out: the rest was dropped
            }
        }
        (got, last)
    });
    let t0 = Instant::now();
    for _ in 0..batches {
        a.write_all(&batch).unwrap();
    }
    let (got, last) = receiver.join().unwrap();
    let secs = last.duration_since(t0).as_secs_f64();
    let s = vlan.stats();
    println!(
        "{frame_len:>5}-byte frames: {:>10.0} frames/s  {:>8.1} MB/s  ({got}/{sent} delivered, {} dropped, {secs:.2} s)",
        got as f64 / secs,
        got as f64 * frame_len as f64 / secs / 1e6,
        s.ports["b"].dropped_out,
    );
}

/// A VDE client as libvdeplug makes one, via the crate's client-side encoder.
fn vde_client(vde: &Path, n: u32) -> (UnixStream, UnixDatagram) {
    use vmrig_net::vde::{encode_request, parse_reply, PortRequest, SOCKADDR_UN_LEN};
    let own = vde.join(format!(".{:05}-{n:05}", std::process::id()));
    let data = UnixDatagram::bind(&own).unwrap();
    let mut ctl = UnixStream::connect(vde.join("ctl")).unwrap();
    ctl.write_all(&encode_request(PortRequest::Any, &own, "QEMU user=bench pid=1").unwrap())
        .unwrap();
    let mut reply = [0u8; SOCKADDR_UN_LEN];
    ctl.read_exact(&mut reply).unwrap();
    data.connect(parse_reply(&reply).unwrap()).unwrap();
    std::fs::remove_file(&own).unwrap();
    (ctl, data)
}

/// `to_vde`: stream port a -> VDE client b; else VDE client a -> stream port b.
fn run_vde(frame_len: usize, total: u64, to_vde: bool) {
    let dir = tempfile::tempdir().unwrap();
    let vlan = Vlan::start(1, dir.path()).unwrap();
    let vde = vlan.vde_dir().unwrap();
    let ss = vlan.add_port("s").unwrap();
    let mut s = UnixStream::connect(&ss).unwrap();
    let (_ctl, d) = vde_client(&vde, 0);
    assert!(vlan.wait_connected("s", 1, Duration::from_secs(5)));
    assert!(vlan.wait_connected("vde1", 1, Duration::from_secs(5)));
    // Teach the switch the receiver's MAC (2); drain the flood at the sender.
    let hello = eth(0xff, 2, 60);
    let mut buf = vec![0u8; 70_000];
    if to_vde {
        d.send(&hello).unwrap();
        let mut dec = FrameDecoder::new();
        while dec.next_frame().unwrap().is_none() {
            let n = s.read(dec.spare()).unwrap();
            dec.commit(n);
        }
    } else {
        s.write_all(&vmrig_net::frame::encode(&hello)).unwrap();
        d.recv(&mut buf).unwrap();
    }
    let frame = eth(2, 1, frame_len);
    let sent = total;
    let (dr, sr) = (d.try_clone().unwrap(), s.try_clone().unwrap());
    let receiver = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut last = Instant::now();
        let mut buf = vec![0u8; 70_000];
        if to_vde {
            dr.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            while got < sent && dr.recv(&mut buf).is_ok() {
                got += 1;
                last = Instant::now();
            }
        } else {
            let mut sr = sr;
            sr.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut dec = FrameDecoder::new();
            while got < sent {
                match sr.read(dec.spare()) {
                    Ok(n) if n > 0 => {
                        dec.commit(n);
                        while dec.next_frame().unwrap().is_some() {
                            got += 1;
                        }
                        last = Instant::now();
                    }
                    _ => break,
                }
            }
        }
        (got, last)
    });
    let t0 = Instant::now();
    if to_vde {
        let batch_frames = (256 * 1024 / (frame_len + 4)).max(1);
        let mut batch = Vec::new();
        for _ in 0..batch_frames {
            encode_into(&mut batch, &frame);
        }
        for _ in 0..total / batch_frames as u64 {
            s.write_all(&batch).unwrap();
        }
    } else {
        for _ in 0..total {
            d.send(&frame).unwrap();
        }
    }
    let (got, last) = receiver.join().unwrap();
    let secs = last.duration_since(t0).as_secs_f64();
    let st = vlan.stats();
    let dropped = st.ports["vde1"].dropped_out + st.ports["s"].dropped_out;
    println!(
        "{frame_len:>5}-byte frames {}: {:>10.0} frames/s  {:>8.1} MB/s  ({got} delivered, {dropped} dropped, {secs:.2} s)",
        if to_vde { "stream -> vde" } else { "vde -> stream" },
        got as f64 / secs,
        got as f64 * frame_len as f64 / secs / 1e6,
    );
}

fn main() {
    // `cargo test --benches` runs this too: keep that quick.
    let quick = std::env::args().any(|a| a == "--test") || std::env::var_os("QUICK").is_some();
    let scale = if quick { 20 } else { 1 };
    run(64, 4_000_000 / scale);
    run(1500, 1_000_000 / scale);
    run(9000, 200_000 / scale);
    for to_vde in [true, false] {
        run_vde(64, 1_000_000 / scale, to_vde);
        run_vde(1500, 500_000 / scale, to_vde);
    }
}
