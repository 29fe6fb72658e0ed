//! Runs `/etc/vmrig/node-setup.sh` of the new root, chrooted, bounded in time.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{log, sys};

pub const SCRIPT: &str = "/etc/vmrig/node-setup.sh";

/// Describes a `waitpid` status.
pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Runs the node setup script if the new root has one. Failures are printed;
/// boot goes on.
pub fn run_node_setup(newroot: &Path, timeout: Duration) {
    let script = newroot.join(&SCRIPT[1..]);
    if std::fs::symlink_metadata(&script).is_err() {
        return;
    }
    log::step(&format!("running {SCRIPT}"));
    let cs = |s: &str| CString::new(s).expect("no NUL");
    let Ok(root) = sys::cstr(newroot) else { return };
    let sh = cs("/bin/sh");
    let argv_s = [cs("/bin/sh"), cs(SCRIPT)];
    let argv: Vec<*const libc::c_char> = argv_s
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".into());
    let env_s = [
        cs("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        cs("HOME=/root"),
        cs("LC_ALL=C"),
        cs(&format!("TERM={term}")),
    ];
    let envp: Vec<*const libc::c_char> = env_s
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect();

    let start = Instant::now();
    // SAFETY: single-threaded; the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        log::error(
            &format!("fork for {SCRIPT}"),
            Some(&io::Error::last_os_error()),
        );
        return;
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on prepared C strings.
        unsafe {
            libc::setpgid(0, 0);
            if libc::chroot(root.as_ptr()) == 0 && libc::chdir(c"/".as_ptr()) == 0 {
                libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            let msg =
                b"vmrig-init: error: cannot run /bin/sh /etc/vmrig/node-setup.sh in the new root\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            log::error(
                &format!("waiting for {SCRIPT}"),
                Some(&io::Error::last_os_error()),
            );
            return;
        }
        if start.elapsed() >= timeout {
            // SAFETY: killing our own child's process group, then the child.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            log::error(
                &format!(
                    "{SCRIPT} did not finish within {} s; killed",
                    timeout.as_secs()
                ),
                None,
            );
            log::hint(
                "the node setup script must not wait for services: systemd is not running yet",
            );
            reap();
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    reap();
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        log::step(&format!(
            "{SCRIPT} done ({} ms)",
            start.elapsed().as_millis()
        ));
    } else {
        log::error(
            &format!("{SCRIPT} failed: {}", describe_status(status)),
            None,
        );
        log::hint("its output is above; boot goes on");
    }
}

/// Reaps zombies left by the script's background children.
fn reap() {
    let mut st = 0;
    // SAFETY: non-blocking wait for any child.
    while unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) } > 0 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text() {
        assert_eq!(describe_status(3 << 8), "exit status 3");
        assert_eq!(describe_status(9), "killed by signal 9");
    }
}
