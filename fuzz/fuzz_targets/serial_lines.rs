//! `serial::LineSplitter` fed the console stream in fuzzer-chosen pieces (including empty
//! ones). Checked against an independent model of its documented rules: `\n` ends a line, a
//! trailing `\r` of a line is dropped, a line longer than `MAX_LINE` bytes is cut into pieces
//! of `MAX_LINE` bytes, invalid UTF-8 is replaced. The model's pieces, with the dropped `\r`s
//! and `\n`s put back, must be the input again, and the splitter's lines must be the pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmrig_fuzz::Input;
use vmrig_vm::serial::{LineSplitter, MAX_LINE};

/// One line according to the documented rules, as raw bytes.
struct Piece<'a> {
    bytes: &'a [u8],
    /// A trailing `\r` was dropped.
    cr: bool,
    /// The line ended at a `\n` (not at a cut or at the end of the stream).
    newline: bool,
}

fn model(input: &[u8]) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut segments: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    // `split` yields one more segment than there are newlines: the unterminated rest.
    let rest = segments.pop().unwrap();
    for (seg, terminated) in segments
        .into_iter()
        .map(|s| (s, true))
        .chain(std::iter::once((rest, false)))
    {
        if seg.is_empty() {
            if terminated {
                pieces.push(Piece {
                    bytes: seg,
                    cr: false,
                    newline: true,
                });
            }
            continue;
        }
        let n = seg.len().div_ceil(MAX_LINE);
        for (i, chunk) in seg.chunks(MAX_LINE).enumerate() {
            let (bytes, cr) = match chunk.strip_suffix(b"\r") {
                Some(b) => (b, true),
                None => (chunk, false),
            };
            pieces.push(Piece {
                bytes,
                cr,
                newline: terminated && i + 1 == n,
            });
        }
    }
    pieces
}

fuzz_target!(|data: &[u8]| {
    // Fills of 128 B .. 32 KiB: enough to cross MAX_LINE (16 KiB) twice; runs of newlines up
    // to 256 bytes.
    let input = Input::parse(data, MAX_LINE / 128, b"\n");
    let bytes = input.bytes();

    let mut chunked = LineSplitter::default();
    let mut got = Vec::new();
    for piece in input.split(&bytes) {
        got.extend(chunked.push(piece));
    }
    got.extend(chunked.finish());
    assert_eq!(chunked.finish(), None, "finish leaves nothing behind");

    let pieces = model(&bytes);
    // The model itself loses nothing but the line ends it documents.
    let mut rebuilt = Vec::with_capacity(bytes.len());
    for p in &pieces {
        rebuilt.extend_from_slice(p.bytes);
        if p.cr {
            rebuilt.push(b'\r');
        }
        if p.newline {
            rebuilt.push(b'\n');
        }
    }
    assert_eq!(rebuilt, bytes);

    // Compared without a copy of every expected line (most are valid UTF-8: borrowed).
    let same = got.len() == pieces.len()
        && got
            .iter()
            .zip(&pieces)
            .all(|(line, p)| *line == String::from_utf8_lossy(p.bytes));
    if !same {
        let expected: Vec<String> = pieces
            .iter()
            .map(|p| String::from_utf8_lossy(p.bytes).into_owned())
            .collect();
        let lens = |v: &[String]| v.iter().map(String::len).collect::<Vec<_>>();
        panic!(
            "lines differ from the documented rules: got {} lines {:?}, expected {} lines {:?}",
            got.len(),
            lens(&got),
            expected.len(),
            lens(&expected)
        );
    }
    for line in &got {
        assert!(!line.contains('\n'));
        // At most MAX_LINE input bytes, each replaced by at most 3 bytes of U+FFFD.
        assert!(line.len() <= 3 * MAX_LINE);
    }
});
