//! Deletes the initramfs, makes the new root `/` and execs init.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::{layer, log, sys, Fatal};

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

fn root_is_ramfs() -> bool {
    // SAFETY: statfs into a zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c"/".as_ptr(), &mut s) == 0
            && matches!(s.f_type as i64, RAMFS_MAGIC | TMPFS_MAGIC)
    }
}

/// Removes everything under `dir` that is on device `dev` (never crosses a
/// mount point). Best effort.
fn delete_tree(dir: &Path, dev: u64, keep: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p == keep {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            delete_tree(&p, dev, keep);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Never returns on success.
pub fn switch_root(newroot: &Path, init: &str, args: Vec<OsString>) -> Fatal {
    let hint = "set vmrig.init= or install systemd-sysv in the image";
    match layer::resolve_in_root(newroot, Path::new(init)).and_then(fs::metadata) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => {
            return Fatal::msg(
                format!("init {init} in the root filesystem is not an executable file"),
                hint,
            )
        }
        Err(e) => {
            return Fatal::new(
                format!("init {init} not found in the root filesystem"),
                e,
                hint,
            )
        }
    }
    log::line(&format!("switching to {init} ({} ms)", log::elapsed_ms()));
    match (fs::metadata("/"), fs::metadata(newroot)) {
        (Ok(r), Ok(n)) if r.dev() != n.dev() => {
            if root_is_ramfs() {
                delete_tree(Path::new("/"), r.dev(), newroot);
                log::step("deleted the initramfs");
            }
        }
        _ => {
            return Fatal::msg(
                format!("{} is not a mount point", newroot.display()),
                "internal error",
            )
        }
    }
    let step = |what: &str, r: io::Result<()>| r.map_err(|e| Fatal::new(what.to_string(), e, ""));
    if let Err(f) = step("chdir to the new root", sys::chdir(newroot))
        .and_then(|()| {
            step(
                "moving the new root to /",
                sys::mount(".", Path::new("/"), None, libc::MS_MOVE, None),
            )
        })
        .and_then(|()| step("chroot to the new root", sys::chroot(Path::new("."))))
        .and_then(|()| step("chdir /", sys::chdir(Path::new("/"))))
    {
        return f;
    }
    log::step(&format!("exec {init}"));
    let e = std::process::Command::new(init)
        .arg0(init)
        .args(args)
        .exec();
    Fatal::new(format!("exec {init}"), e, hint)
}
