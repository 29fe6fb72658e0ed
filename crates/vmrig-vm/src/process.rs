//! Child processes that never outlive the driver: every child vmrig starts on the host is
//! set up here ([`command`], [`die_with_parent`], [`spawn_guarded`]).
//!
//! Every child is started with `PR_SET_PDEATHSIG(SIGKILL)`, in its own process group (but
//! for the interactive REPL's Python, which reads the terminal). The death signal fires when
//! the *thread* that forked the child exits: a child the calling thread waits for (a tool,
//! `qemu-img`, `tar`, `tesseract`, the script's Python) is forked by that thread; children
//! that outlive the call (QEMU) are forked by one long-lived spawner thread. A SIGKILL of the
//! driver therefore kills every child; on normal exits `Drop` kills QEMU's group and reaps.
//! (The run directory's watcher in `vmrig_driver::cleanup` is the one exception: it must
//! outlive a SIGKILLed driver to remove the directory.)

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("vmrig-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("failed to start the spawner thread");
        Mutex::new(tx)
    })
}

/// `program` as a command that dies with this process: every child vmrig starts on the
/// host is made here (or passed through [`die_with_parent`]). Its own process group, and
/// SIGKILL when the forking *thread* ends: right for a child that the calling thread waits
/// for (a tool, `qemu-img`, `tar`, `tesseract`); a child that outlives the call goes through
/// [`spawn_guarded`] (QEMU).
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    die_with_parent(&mut cmd, true);
    cmd
}

/// Makes `cmd` die with this process: `PR_SET_PDEATHSIG(SIGKILL)` (checked against a parent
/// that died before the `prctl`), and with `own_group` its own process group (so a
/// terminal's Ctrl-C reaches only the driver, which decides; the interactive REPL's Python
/// stays in the terminal's group to read it).
pub fn die_with_parent(cmd: &mut Command, own_group: bool) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if own_group && libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may already be gone between fork and prctl. Compare with its pid,
            // not with 1: an orphan goes to the nearest subreaper (systemd --user, a
            // container's init, a test harness), which need not be pid 1.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` in a new process group, killed if this process dies, from the long-lived
/// spawner thread (so the death signal waits for the process, not the calling thread).
pub fn spawn_guarded(mut cmd: Command) -> io::Result<Child> {
    die_with_parent(&mut cmd, true);
    let (tx, rx) = channel();
    spawner()
        .lock()
        .unwrap()
        .send((cmd, tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// A child process group that is killed and reaped when dropped.
#[derive(Debug)]
pub struct GuardedChild {
    child: Child,
    reaped: bool,
}

impl GuardedChild {
    pub fn spawn(cmd: Command) -> io::Result<GuardedChild> {
        let child = spawn_guarded(cmd)?;
        register(child.id());
        Ok(GuardedChild {
            child,
            reaped: false,
        })
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.reaped = true;
            unregister(self.child.id());
        }
        Ok(status)
    }

    /// Waits for exit up to `timeout`; returns the status if it exited.
    pub fn wait_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILLs the whole process group and reaps the leader.
    pub fn kill(&mut self) {
        if !self.reaped {
            kill_group(self.child.id());
            let _ = self.child.wait();
            self.reaped = true;
            unregister(self.child.id());
        }
    }
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_group(pid: u32) {
    // SAFETY: plain syscall; a negative pid addresses the process group.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
}

fn live_groups() -> &'static Mutex<Vec<u32>> {
    static GROUPS: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    GROUPS.get_or_init(|| Mutex::new(Vec::new()))
}

fn register(pid: u32) {
    live_groups().lock().unwrap().push(pid);
}

fn unregister(pid: u32) {
    live_groups().lock().unwrap().retain(|p| *p != pid);
}

/// Kills every live child group: for signal handlers (SIGINT, SIGTERM) before exiting.
pub fn kill_all_children() {
    let groups = live_groups().lock().map(|g| g.clone()).unwrap_or_default();
    for pid in groups {
        kill_group(pid);
    }
}

/// Whether `path` is a file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` itself when it names a path (it has a `/`), else the first executable
/// `<dir>/<program>` of `dirs`.
pub fn find_program_in(
    program: impl AsRef<Path>,
    dirs: impl IntoIterator<Item = PathBuf>,
) -> Option<PathBuf> {
    let program = program.as_ref();
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_owned());
    }
    dirs.into_iter()
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// [`find_program_in`] `$PATH`, then the sbin directories (which non-root PATHs lack, and
/// where mke2fs and depmod live).
pub fn find_program(program: impl AsRef<Path>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    find_program_in(program, dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_kills_the_whole_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $! ; wait"])
            .stdout(std::process::Stdio::piped());
        let mut child = GuardedChild::spawn(cmd).unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.child_mut().stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        drop(child);
        // The grandchild was in the group: it is gone (or a zombie being reaped by init).
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "grandchild still alive: {stat}"
        );
    }

    #[test]
    fn children_run_in_their_own_process_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ps -o pgid= -p $$"])
            .stdout(std::process::Stdio::piped());
        let mut child = GuardedChild::spawn(cmd).unwrap();
        let pid = child.id();
        let out = {
            let mut s = String::new();
            use std::io::Read;
            child
                .child_mut()
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        assert_eq!(out.trim(), pid.to_string());
    }
}
