//! Throughput of one VLAN switch (one thread) between two fake QEMU ports over real unix
//! sockets: `cargo bench -p vmrig-net`. Prints frames/s and MB/s for 64- and 1500-byte frames.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
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

fn main() {
    // `cargo test --benches` runs this too: keep that quick.
    let quick = std::env::args().any(|a| a == "--test") || std::env::var_os("QUICK").is_some();
    let scale = if quick { 20 } else { 1 };
    run(64, 4_000_000 / scale);
    run(1500, 1_000_000 / scale);
    run(9000, 200_000 / scale);
}
