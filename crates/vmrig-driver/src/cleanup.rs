//! Cleanup on every exit path: SIGINT and SIGTERM stop every VM and the script, remove
//! the run's temporary directories and exit with 130 / 143. (SIGKILL cannot be caught:
//! children die through PR_SET_PDEATHSIG, see `vmrig_vm::process`, and temporary
//! directories of a killed driver are removed by the next run, see [`sweep_stale_run_dirs`].)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use vmrig_python::ScriptKiller;

#[derive(Default)]
struct Registry {
    dirs: Vec<PathBuf>,
    scripts: Vec<(u64, ScriptKiller)>,
    next_script: u64,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

static IGNORE_SIGINT: AtomicBool = AtomicBool::new(false);

/// Removes `dir` if the driver is interrupted.
pub fn register_dir(dir: &Path) {
    registry().lock().unwrap().dirs.push(dir.to_owned());
}

pub fn unregister_dir(dir: &Path) {
    registry().lock().unwrap().dirs.retain(|d| d != dir);
}

/// Kills the script if the driver is interrupted; returns a handle for [`unregister_script`].
pub fn register_script(killer: ScriptKiller) -> u64 {
    let mut r = registry().lock().unwrap();
    r.next_script += 1;
    let id = r.next_script;
    r.scripts.push((id, killer));
    id
}

/// Forgets one run's script (other runs of the same process keep theirs).
pub fn unregister_script(id: u64) {
    registry().lock().unwrap().scripts.retain(|(i, _)| *i != id);
}

/// While the interactive REPL runs, Ctrl-C belongs to Python.
pub fn ignore_sigint(ignore: bool) {
    IGNORE_SIGINT.store(ignore, Ordering::SeqCst);
}

/// Stops everything this process started and removes its temporary directories.
pub fn stop_everything() {
    let (dirs, scripts) = {
        let r = registry().lock().unwrap_or_else(|e| e.into_inner());
        (
            r.dirs.clone(),
            r.scripts.iter().map(|(_, k)| k.clone()).collect::<Vec<_>>(),
        )
    };
    for s in scripts {
        s.kill();
    }
    vmrig_vm::process::kill_all_children();
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Installs the SIGINT/SIGTERM handling (once).
pub fn install_signal_handlers() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else { return };
        std::thread::Builder::new()
            .name("vmrig-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGINT && IGNORE_SIGINT.load(Ordering::SeqCst) {
                        continue;
                    }
                    let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                    eprintln!("\nvmrig: interrupted by {name}: stopping all VMs and removing temporary files");
                    stop_everything();
                    std::process::exit(128 + sig);
                }
            })
            .expect("failed to start the signal thread");
    });
}

/// The prefix of run directories (`$TMPDIR/vmrig-run-<pid>-XXXX`).
pub const RUN_DIR_PREFIX: &str = "vmrig-run-";

/// Removes run directories left by drivers that were SIGKILLed (their pid is gone).
pub fn sweep_stale_run_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(RUN_DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && !entry.path().join("keep").exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_only_dirs_of_dead_drivers() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(format!("{RUN_DIR_PREFIX}999999999-abc"));
        let alive = tmp
            .path()
            .join(format!("{RUN_DIR_PREFIX}{}-abc", std::process::id()));
        let other = tmp.path().join("something-else");
        for d in [&dead, &alive, &other] {
            std::fs::create_dir(d).unwrap();
        }
        sweep_stale_run_dirs(tmp.path());
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(other.exists());
    }
}

/// A run directory that disappears with the driver, even when the driver is SIGKILLed:
/// a small watcher process (`sh`, in its own session) holds the read end of a pipe whose
/// write end only the driver has. When the driver dies, the watcher reads EOF and removes
/// the directory; on a normal end the driver tells it to keep or to do nothing.
pub struct RunDir {
    path: PathBuf,
    keep: bool,
    watcher: Option<(std::process::Child, std::fs::File)>,
}

impl RunDir {
    /// Creates `$TMPDIR/vmrig-run-<pid>-XXXXXX` (short, for unix socket paths).
    pub fn create(keep: bool) -> std::io::Result<RunDir> {
        let tmp = std::env::temp_dir();
        sweep_stale_run_dirs(&tmp);
        let path = tempfile::Builder::new()
            .prefix(&format!("{RUN_DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in(&tmp)?
            .keep();
        register_dir(&path);
        let watcher = spawn_watcher(&path).ok();
        Ok(RunDir {
            path,
            keep,
            watcher,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn spawn_watcher(path: &Path) -> std::io::Result<(std::process::Child, std::fs::File)> {
    use std::os::unix::process::CommandExt;
    let (read, write) = pipe()?;
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "read -r word; [ \"$word\" = keep ] || [ \"$word\" = done ] || rm -rf -- \"$1\"",
        "vmrig-cleanup",
    ])
    .arg(path)
    .stdin(read)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; a new session keeps the terminal's Ctrl-C away.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok((cmd.spawn()?, write))
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own; O_CLOEXEC keeps them out of other children.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned here.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

impl Drop for RunDir {
    fn drop(&mut self) {
        unregister_dir(&self.path);
        if self.keep {
            let _ = std::fs::write(self.path.join("keep"), b"");
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
        if let Some((mut child, mut write)) = self.watcher.take() {
            use std::io::Write;
            let _ = writeln!(write, "{}", if self.keep { "keep" } else { "done" });
            drop(write);
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod run_dir_tests {
    use super::*;

    #[test]
    fn dropped_run_dir_is_removed_or_kept() {
        let dir = RunDir::create(false).unwrap();
        let path = dir.path().to_owned();
        assert!(path.exists());
        drop(dir);
        assert!(!path.exists());
        let kept = RunDir::create(true).unwrap();
        let path = kept.path().to_owned();
        drop(kept);
        assert!(path.exists());
        std::fs::remove_dir_all(path).unwrap();
    }

    #[test]
    fn watcher_removes_the_dir_when_the_owner_vanishes() {
        let mut dir = RunDir::create(false).unwrap();
        let path = dir.path().to_owned();
        // Simulate the driver's death: close the write end without a word.
        let (mut child, write) = dir.watcher.take().unwrap();
        drop(write);
        child.wait().unwrap();
        assert!(!path.exists());
        std::mem::forget(dir);
    }
}
