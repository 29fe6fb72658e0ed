//! `backdoor::parse_reply` (the reply framing: `T <status> <length>\n<bytes>\n` or
//! `B <base64> <status>\n`) on arbitrary guest bytes: never a panic; a complete reply parses
//! the same from any valid `scanned` hint, its every proper prefix is "incomplete" (never an
//! error), and an error is final (more bytes cannot make it valid); any (status, output)
//! survives both framings.
//!
//! Input: byte 0 and 1 pick a `scanned` hint and a prefix length; the rest is the buffer.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use vmrig_vm::backdoor::{parse_reply, CommandOutput, ShellError};

type Parsed = Result<Option<(CommandOutput, usize)>, ShellError>;

fn same(a: &Parsed, b: &Parsed) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x == y,
        (Err(ShellError::Protocol(x)), Err(ShellError::Protocol(y))) => x == y,
        (Err(ShellError::TooLarge), Err(ShellError::TooLarge)) => true,
        _ => false,
    }
}

fn bounded(r: &Parsed) {
    match r {
        Ok(_) | Err(ShellError::TooLarge) => {}
        Err(ShellError::Protocol(excerpt)) => {
            assert!(excerpt.chars().count() <= 203, "excerpt not bounded")
        }
        Err(e) => panic!("unexpected error kind from parse_reply: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [a, b, buf @ ..] = data else { return };
    let whole = parse_reply(buf, 0);
    bounded(&whole);

    // The hint as the shell computes it: a length up to which there is no newline.
    let no_newline = buf.iter().position(|&c| c == b'\n').unwrap_or(buf.len());
    let hint = (*a as usize * 17).min(no_newline);
    let hinted = parse_reply(buf, hint);
    assert!(
        same(&whole, &hinted),
        "hint {hint} changed {whole:?} to {hinted:?}"
    );
    // Out-of-range hints must not panic either.
    bounded(&parse_reply(buf, *a as usize * 64));

    let cut = (*b as usize * 17).min(buf.len());
    let prefix = parse_reply(&buf[..cut], 0);
    bounded(&prefix);
    match &whole {
        Ok(Some((out, used))) => {
            assert!(*used <= buf.len());
            assert!(out.stdout.len() <= *used);
            // Bytes after the reply do not belong to it.
            assert!(same(&whole, &parse_reply(&buf[..*used], 0)));
            if cut < *used {
                assert!(
                    matches!(prefix, Ok(None)),
                    "prefix of {cut} of a {used}-byte reply gave {prefix:?}"
                );
            }
        }
        Ok(None) => {
            // Incomplete: so is every prefix.
            assert!(
                matches!(prefix, Ok(None)),
                "{prefix:?} for a prefix of an incomplete reply"
            );
        }
        Err(_) => {}
    }
    if prefix.is_err() {
        assert!(
            whole.is_err(),
            "an error on {cut} bytes became {whole:?} with more"
        );
    }

    // The guest's side of the protocol: any output and status come back unchanged.
    if buf.len() >= 4 {
        let (status, stdout) = buf.split_at(4);
        let status = i32::from_le_bytes(status.try_into().unwrap());
        let mut text = format!("T {status} {}\n", stdout.len()).into_bytes();
        text.extend_from_slice(stdout);
        text.push(b'\n');
        let b64 = base64::engine::general_purpose::STANDARD.encode(stdout);
        let exact = format!("B {b64} {status}\n").into_bytes();
        for reply in [text, exact] {
            let (out, used) = parse_reply(&reply, 0)
                .expect("a well-formed reply")
                .expect("a complete reply");
            assert_eq!(
                (out.status, &out.stdout[..], used),
                (status, stdout, reply.len())
            );
        }
    }
});
