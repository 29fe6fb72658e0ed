use proptest::prelude::*;
use vmrig_net::frame::{encode, FrameDecoder, MAX_FRAME};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever way the byte stream is cut into reads, the same frames come out, in order.
    #[test]
    fn any_chunking_yields_the_same_frames(
        frames in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                prop::collection::vec(any::<u8>(), 1400..1600),
                prop::collection::vec(any::<u8>(), 60_000..MAX_FRAME + 1),
            ],
            0..12,
        ),
        cuts in prop::collection::vec(1usize..5000, 1..64),
    ) {
        let wire: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let n = cuts[i % cuts.len()].min(wire.len() - pos);
            i += 1;
            // As the switch does: read(2) straight into the spare space.
            let spare = dec.spare();
            let n = n.min(spare.len());
            spare[..n].copy_from_slice(&wire[pos..pos + n]);
            dec.commit(n);
            pos += n;
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        prop_assert_eq!(dec.pending(), 0);
        prop_assert_eq!(got, frames);
    }

    /// Arbitrary bytes never panic the decoder: it yields frames of at most MAX_FRAME bytes and
    /// then either waits for more or reports an oversized length, for good.
    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..20_000), chunk in 1usize..3000) {
        let mut dec = FrameDecoder::new();
        let mut broken = false;
        for c in data.chunks(chunk) {
            dec.feed(c);
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => prop_assert!(f.len() <= MAX_FRAME),
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(e.0 > MAX_FRAME as u64);
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                prop_assert!(dec.next_frame().is_err());
                break;
            }
        }
    }
}
