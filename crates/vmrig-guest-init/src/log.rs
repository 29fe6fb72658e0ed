//! Console output: every line goes to fd 2 (the kernel console) prefixed `vmrig-init: `.

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static DEBUG: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Records the start time; call first thing in `main`.
pub fn init_clock() {
    START.get_or_init(Instant::now);
}

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Milliseconds since `init_clock`.
pub fn elapsed_ms() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_millis()
}

/// Writes one whole line (single `write` where possible, so lines do not interleave).
pub fn line(msg: &str) {
    let s = format!("vmrig-init: {msg}\n");
    let mut buf = s.as_bytes();
    while !buf.is_empty() {
        // SAFETY: writing a valid buffer to fd 2.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// A step of the boot; printed with its time only under `vmrig.debug`.
pub fn step(msg: &str) {
    if debug() {
        line(&format!("[{:>6} ms] {msg}", elapsed_ms()));
    }
}

/// `vmrig-init: error: <what> (<errno text>)`.
pub fn error(what: &str, err: Option<&io::Error>) {
    match err {
        Some(e) => line(&format!("error: {what} ({})", errno_text(e))),
        None => line(&format!("error: {what}")),
    }
}

pub fn hint(h: &str) {
    if !h.is_empty() {
        line(&format!("hint: {h}"));
    }
}

/// `ENOENT: No such file or directory` for OS errors, the message otherwise.
pub fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            // SAFETY: strerror returns a valid C string; we are single-threaded.
            let desc = unsafe { CStr::from_ptr(libc::strerror(n)) }.to_string_lossy();
            match errno_name(n) {
                Some(name) => format!("{name}: {desc}"),
                None => format!("errno {n}: {desc}"),
            }
        }
        None => e.to_string(),
    }
}

fn errno_name(n: i32) -> Option<&'static str> {
    Some(match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::ENOTBLK => "ENOTBLK",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENOKEY => "ENOKEY",
        libc::EKEYREJECTED => "EKEYREJECTED",
        libc::EUCLEAN => "EUCLEAN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return None,
    })
}
