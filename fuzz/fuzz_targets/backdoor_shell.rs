//! `backdoor::Shell` against a fake guest sending arbitrary bytes, cut into reads of
//! fuzzer-chosen sizes with injected I/O errors (see `vmrig_fuzz::Input`): waiting for the
//! banner and running commands return Ok or Err, never panic or spin, and heap use stays
//! bounded (by the banner limit while waiting for the banner, by what the guest sent later).
//!
//! Flags: `flag_a` runs a second command with an expired deadline (the shell becomes busy)
//! and a third one; `flag_b` uses the exact (base64) framing instead of the text one.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vmrig_fuzz::{Input, WriteMode};
use vmrig_vm::backdoor::{frame, Framing, Shell, ShellError};

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap growth over `base` since the last reset.
fn reset_peak() -> usize {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    base
}

const MIB: usize = 1 << 20;
/// The fake guest never blocks, so deadlines only bound retries after injected
/// WouldBlock/TimedOut errors; a far deadline turns any spin into a libFuzzer timeout.
const FAR: Duration = Duration::from_secs(600);

fuzz_target!(|data: &[u8]| {
    // Fills of 512 B .. 128 KiB: enough to cross the 64 KiB banner-line limit and, in fuzz
    // builds (MAX_OUTPUT = 64 KiB there), the bound of a reply being received (87 KiB of
    // base64). Runs of newlines up to 256 bytes.
    let input = Input::parse(data, 512, b"\n");
    let total = input.stream_len();
    let mut shell = Shell::new(input.stream());

    let base = reset_peak();
    let banner = shell.wait_for_banner(Instant::now() + FAR);
    let peak = PEAK.load(Relaxed) - base;
    // The banner wait keeps at most one line of 64 KiB plus one 64 KiB read (and its lossy
    // copy), however much the guest sends.
    assert!(peak <= 2 * MIB, "banner wait used {peak} bytes of heap");
    match &banner {
        Ok(()) => {}
        Err(ShellError::Closed | ShellError::TooLarge | ShellError::Io(_)) => return,
        Err(e) => panic!("unexpected banner error {e:?}"),
    }

    let framing = if input.flag_b() {
        Framing::Exact
    } else {
        Framing::Text
    };
    let base = reset_peak();
    let sent = frame("echo hi", framing).unwrap();
    let first = shell.run_framed("echo hi", framing, Some(Instant::now() + FAR));
    check(&first, total);
    if input.flag_a() {
        // An expired deadline: times out unless a reply line is already buffered.
        let late = shell.run_framed("sleep 1000", framing, Some(Instant::now()));
        check(&late, total);
        let third = shell.run_framed("true", framing, Some(Instant::now() + FAR));
        check(&third, total);
    }
    let peak = PEAK.load(Relaxed) - base;
    assert!(
        peak <= 6 * total + 2 * MIB,
        "runs used {peak} bytes of heap for {total} bytes from the guest"
    );

    // What the host sent: the framed command first (when writes work).
    let stream = shell.stream_mut();
    assert!(stream.delivered <= total);
    if input.write_mode() == WriteMode::Ok && banner.is_ok() && first.is_ok() {
        let written = String::from_utf8(stream.written.clone()).unwrap();
        assert!(written.starts_with(&sent), "{written:?}");
    }
});

fn check(r: &Result<vmrig_vm::backdoor::CommandOutput, ShellError>, total: usize) {
    match r {
        Ok(out) => assert!(out.stdout.len() <= total),
        Err(ShellError::Protocol(excerpt)) => assert!(excerpt.chars().count() <= 203),
        Err(ShellError::NulInCommand) => panic!("no NUL in our commands"),
        Err(_) => {}
    }
}
