//! Real VMs with a display (TCG on hosts without usable KVM): OCR of the text console and
//! of an X terminal, keys, X11 windows and image matching. They need the host's
//! `tesseract` (`apt-get install tesseract-ocr tesseract-ocr-eng`); the `vm` nextest group
//! runs them one at a time.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::{assert_no_leftovers, text};

/// `vmrig ARGS`, never answered from the result cache: vm_examples runs the same examples
/// with the same binary and store, and these tests are about what a real run shows.
fn vmrig(args: &[&str], tmp: &Path) -> Output {
    common::vmrig_rerun(args, tmp)
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}

fn run_example(example: &str, tmp: &Path) -> (String, PathBuf) {
    let out_dir = tmp.join("out");
    let out = vmrig(&["run", example, "-o", out_dir.to_str().unwrap()], tmp);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_no_leftovers(tmp);
    (log, out_dir)
}

#[test]
fn console_example_reads_the_login_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, out_dir) = run_example("examples/console.toml", tmp.path());
    assert!(log.contains("test console passed"), "{log}");
    assert!(log.contains("found \"login:\" on the screen"), "{log}");
    assert!(log.contains("sending keys \"root\\n\""), "{log}");
    assert!(
        log.contains("found \"root@machine\" on the screen"),
        "{log}"
    );
    let shot = out_dir.join("console.png");
    assert!(is_png(&shot), "{}", shot.display());
    assert!(
        log.contains(&format!("screenshot saved to {}", shot.display())),
        "{log}"
    );
}

#[test]
fn desktop_example_types_in_an_xterm_and_finds_text_and_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, out_dir) = run_example("examples/desktop.toml", tmp.path());
    assert!(log.contains("test desktop passed"), "{log}");
    assert!(log.contains("waiting for the X11 server"), "{log}");
    assert!(
        log.contains("found \"vmrig-ocr-ok\" on the screen"),
        "{log}"
    );
    assert!(log.contains("desktop-ref.png at ("), "{log}");
    assert!(is_png(&out_dir.join("desktop.png")));
}

/// Failing screen waits end by their timeout, say what they saw and keep the last screen.
#[test]
fn failed_screen_waits_are_bounded_and_keep_the_evidence() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("screen-fails.toml");
    // The node of examples/console.toml (same image); the reference is noise.
    // A reference that is nowhere on the screen: noise (as PGM, which is read like PNG).
    let reference = tmp.path().join("noise.pgm");
    let mut state = 7u32;
    let mut pgm = b"P5\n64 64\n255\n".to_vec();
    pgm.extend((0..64 * 64).map(|_| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (state >> 24) as u8
    }));
    std::fs::write(&reference, pgm).unwrap();
    let script = format!(
        r#"import time
try:
    machine.wait_for_text("login:")
except Exception as e:
    print("NOT-STARTED", type(e).__name__, e)
machine.start()
machine.wait_for_text("login:")
t.assertFalse(machine.screen_matches({reference:?}))
start = time.monotonic()
try:
    machine.wait_for_image({reference:?}, timeout=8)
except Exception as e:
    print("IMAGE-ERROR", type(e).__name__, e)
print("IMAGE-ELAPSED", time.monotonic() - start)
start = time.monotonic()
try:
    machine.wait_for_text("no-such-text-on-screen", timeout=6)
except Exception as e:
    print("TEXT-ERROR", type(e).__name__, e)
print("TEXT-ELAPSED", time.monotonic() - start)
"#
    );
    std::fs::write(
        &file,
        format!(
            "name = \"screen-fails\"\ntest_script = '''\n{script}'''\n\n[nodes.machine]\npackages = [\"less\"]\ngraphics = true\nkernel_params = [\"fbcon=nodefer\"]\n"
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let started = Instant::now();
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(started.elapsed() < Duration::from_secs(600));
    let elapsed = |tag: &str| -> f64 {
        let line = log
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("{tag}: {log}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(
        log.contains("does not match the screen: best score"),
        "{log}"
    );
    assert!(log.contains("IMAGE-ERROR"), "{log}");
    assert!(log.contains("is below the threshold 0.95"), "{log}");
    assert!(elapsed("IMAGE-ELAPSED") < 8.0 + 5.0, "{log}");
    assert!(
        is_png(&out_dir.join("machine-wait_for_image-failed.png")),
        "{log}"
    );
    let details =
        std::fs::read_to_string(out_dir.join("machine-wait_for_image-failed.txt")).unwrap();
    assert!(details.contains("best score: "), "{details}");
    assert!(log.contains("TEXT-ERROR"), "{log}");
    assert!(log.contains("the screen read:"), "{log}");
    assert!(elapsed("TEXT-ELAPSED") < 6.0 + 3.0, "{log}");
    assert!(
        is_png(&out_dir.join("machine-wait_for_text-failed.png")),
        "{log}"
    );
    assert_no_leftovers(tmp.path());
}
