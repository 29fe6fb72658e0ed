//! Thin wrapper around `flock(2)`.
//!
//! Every lock is taken on its own open file description, so two locks taken
//! by the same process on the same file conflict exactly like locks taken by
//! two processes. Locks are released when the [`File`] is closed (dropped),
//! and by the kernel when the process dies.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn op(mode: Mode) -> libc::c_int {
    match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    }
}

/// Open (creating if needed) `path` and lock it, waiting as long as needed.
pub(crate) fn lock(path: &Path, mode: Mode) -> io::Result<File> {
    let file = open_lock_file(path)?;
    flock(&file, op(mode))?;
    Ok(file)
}

/// Open (creating if needed) `path` and try to lock it without waiting.
/// Returns `Ok(None)` when someone else holds a conflicting lock.
pub(crate) fn try_lock(path: &Path, mode: Mode) -> io::Result<Option<File>> {
    let file = open_lock_file(path)?;
    match flock(&file, op(mode) | libc::LOCK_NB) {
        Ok(()) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(e),
    }
}
