//! The QMP client against a fake QEMU sending arbitrary bytes, cut into reads of
//! fuzzer-chosen sizes with injected I/O errors (see `vmrig_fuzz::Input`): the handshake,
//! commands and event waits return Ok or a `QmpError`, never panic or spin; every command
//! the client writes is one JSON line with the next id.
//!
//! Flags: `flag_a` uses `human-monitor-command` (a string reply) instead of `query-status`;
//! `flag_b` waits for a named event (keeping the others queued) before draining events.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmrig_fuzz::{Input, WriteMode};
use vmrig_vm::qmp::{Qmp, QmpError, MAX_LINE_LEN};

/// The fake never blocks; deadlines only bound retries after injected timeouts.
const T: Duration = Duration::from_secs(600);

fn check<V>(r: &Result<V, QmpError>) {
    if let Err(QmpError::Protocol { excerpt, .. }) = r {
        assert!(excerpt.chars().count() <= 203, "excerpt not bounded");
    }
}

fuzz_target!(|data: &[u8]| {
    // Fills of MAX_LINE_LEN / 128 .. 2 * MAX_LINE_LEN (64 KiB in fuzz builds, not 16 MiB);
    // runs of newlines up to 256 bytes.
    let input = Input::parse(data, MAX_LINE_LEN / 128, b"\n");
    let total = input.stream_len();
    let hs = Qmp::handshake(input.stream(), T);
    check(&hs);
    let Ok(mut q) = hs else { return };
    assert!(q.greeting().is_object());
    let _ = q.qemu_version();

    if input.flag_a() {
        check(&q.human_monitor_command("info status"));
    } else {
        check(&q.query_status());
    }
    if input.flag_b() {
        let before = q.queued_events();
        let r = q.wait_for_event("SHUTDOWN", T);
        check(&r);
        if let Ok(Some(e)) = &r {
            assert_eq!(e.name, "SHUTDOWN");
        } else {
            assert!(q.queued_events() >= before, "wait_for_event lost events");
        }
    }
    for _ in 0..64 {
        let r = q.next_event(T);
        check(&r);
        if !matches!(r, Ok(Some(_))) {
            break;
        }
    }
    // The connection after whatever happened above (sticky EOF, resync after a long line).
    check(&q.execute("stop", None, T));
    let events = q.take_events();
    assert!(events.len() <= total);

    // Every write is one command line with ids 1, 2, 3, ...
    let stream = q.into_inner();
    assert!(stream.delivered <= total);
    if input.write_mode() == WriteMode::Ok {
        let written = String::from_utf8(stream.written).expect("commands are UTF-8");
        assert!(written.ends_with('\n'));
        for (i, line) in written.lines().enumerate() {
            let v: Value = serde_json::from_str(line).expect("a command is one JSON line");
            assert!(v["execute"].is_string(), "{line}");
            assert_eq!(v["id"].as_u64(), Some(i as u64 + 1), "{line}");
        }
    }
});
