//! The switch's parsing of what a QEMU port sends: `frame::FrameDecoder` fed in fuzzer-chosen
//! pieces (alternately through `feed` and through `spare` + `commit`) must yield exactly the
//! frames and the error of a plain sequential decode of the whole stream; every frame, of any
//! length, then goes through `policy::route`, which must not panic on short frames.
//!
//! Flags: `flag_a` feeds only through `feed`; `flag_b` routes every prefix of the stream
//! (up to 64 bytes) as a frame too.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vmrig_fuzz::Input;
use vmrig_net::frame::{FrameDecoder, FrameTooLarge, MAX_FRAME, MIN_FRAME, PREFIX};
use vmrig_net::policy::{dst_mac, is_group, route, src_mac, MacTable, Target};

/// Sequential decode: the frames, the error if one, and the bytes left over.
fn reference(mut s: &[u8]) -> (Vec<&[u8]>, Option<FrameTooLarge>, usize) {
    let mut frames = Vec::new();
    while s.len() >= PREFIX {
        let len = u32::from_be_bytes(s[..4].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return (frames, Some(FrameTooLarge(len as u64)), s.len());
        }
        if s.len() < PREFIX + len {
            break;
        }
        frames.push(&s[PREFIX..PREFIX + len]);
        s = &s[PREFIX + len..];
    }
    (frames, None, s.len())
}

fn drain(d: &mut FrameDecoder, frames: &mut Vec<Vec<u8>>, err: &mut Option<FrameTooLarge>) {
    loop {
        match d.next_frame() {
            Ok(Some(f)) => {
                assert!(f.len() <= MAX_FRAME);
                frames.push(f.to_vec());
            }
            Ok(None) => return,
            Err(e) => {
                if let Some(old) = err {
                    assert_eq!(*old, e, "the error sticks");
                }
                *err = Some(e);
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Fills of 544 B .. 136 KiB: enough for maximal frames (MAX_FRAME = 68 KiB). Runs of zero
    // bytes (empty frames, 4 bytes each) up to 256 bytes.
    let input = Input::parse(data, MAX_FRAME / 128, b"\0");
    let bytes = input.bytes();

    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut err = None;
    for (i, piece) in input.split(&bytes).into_iter().enumerate() {
        if input.flag_a() || i % 2 == 0 || err.is_some() {
            d.feed(piece);
            drain(&mut d, &mut frames, &mut err);
        } else {
            let mut rest = piece;
            while !rest.is_empty() && err.is_none() {
                let spare = d.spare();
                assert!(
                    spare.len() >= MAX_FRAME + PREFIX,
                    "spare is one maximal frame"
                );
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                d.commit(n);
                rest = &rest[n..];
                drain(&mut d, &mut frames, &mut err);
            }
            if !rest.is_empty() {
                d.feed(rest);
                drain(&mut d, &mut frames, &mut err);
            }
        }
    }
    let (want, want_err, left) = reference(&bytes);
    assert_eq!(frames.len(), want.len());
    assert!(frames.iter().zip(&want).all(|(a, b)| a == b));
    assert_eq!(err, want_err);
    assert_eq!(d.pending(), left);

    let mut table = MacTable::new(Duration::from_secs(300));
    let now = Instant::now();
    let mut route_one = |frame: &[u8], port: usize| {
        let target = route(&mut table, frame, port, now);
        if frame.len() >= MIN_FRAME {
            let (dst, src) = (dst_mac(frame), src_mac(frame));
            if is_group(&dst) {
                assert_eq!(target, Target::Flood);
            }
            if !is_group(&src) {
                assert_eq!(table.lookup(&src, now), Some(port), "source learned");
            }
            match target {
                Target::Unicast(p) => {
                    assert_ne!(p, port);
                    assert_eq!(table.lookup(&dst, now), Some(p));
                }
                Target::Filter => assert_eq!(table.lookup(&dst, now), Some(port)),
                Target::Flood => {}
            }
        }
    };
    for (i, f) in frames.iter().enumerate() {
        route_one(f, i % 3);
    }
    if input.flag_b() {
        for n in 0..=bytes.len().min(64) {
            route_one(&bytes[..n], n % 3);
        }
    }
});
