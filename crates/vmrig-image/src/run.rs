//! Running a build tool with its output streamed to the observer and its tail kept for errors.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

use crate::{BuildObserver, ImageError};

/// How many trailing lines of a failed tool's output an error keeps.
const TAIL_LINES: usize = 25;

/// Runs `cmd`, forwarding each output line (stdout and stderr) to `observer` under `step`.
/// On failure returns [`ImageError::Tool`] holding the command and its last lines.
pub fn run_tool(
    cmd: &mut Command,
    step: &str,
    observer: &dyn BuildObserver,
) -> Result<Vec<String>, ImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let rendered = render(cmd);
    let mut cmd = guarded(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn { program, source })?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let out_thread = thread::spawn(move || forward(stdout, tx));
    let err_thread = thread::spawn(move || forward(stderr, tx2));
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in rx {
        observer.line(step, &line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let _ = out_thread.join();
    let _ = err_thread.join();
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: rendered.clone(),
        source,
    })?;
    let tail: Vec<String> = tail.into();
    if status.success() {
        Ok(tail)
    } else {
        Err(tool_error(rendered, status.to_string(), tail))
    }
}

/// A failed tool's error: [`ImageError::ToolDiskFull`] when its output says that a disk (or
/// a quota) was full, else [`ImageError::Tool`]. A child's `ENOSPC` reaches vmrig only as
/// text, so this is the one place that reads it from text.
fn tool_error(command: String, status: String, lines: Vec<String>) -> ImageError {
    let output = lines.join("\n");
    let full = lines
        .iter()
        .find(|l| l.contains("No space left on device") || l.contains("Disk quota exceeded"));
    match full {
        Some(line) => ImageError::ToolDiskFull {
            command,
            status,
            output,
            path: first_absolute_path(line),
        },
        None => ImageError::Tool {
            command,
            status,
            output,
            lines,
        },
    }
}

/// The first absolute path in a tool's message (`cp: error writing '/x/y': ...`), without
/// the quotes or colon around it.
fn first_absolute_path(line: &str) -> Option<PathBuf> {
    line.split_whitespace()
        .map(|w| w.trim_matches(|c| matches!(c, '\'' | '"' | '`' | ':' | ',' | '(' | ')')))
        .find(|w| w.starts_with('/') && w.len() > 1)
        .map(PathBuf::from)
}

/// `cmd`, made to die with this process, with everything it started and everything it
/// mounted. Its first process gets SIGKILL when the calling thread ends (PR_SET_PDEATHSIG;
/// `run_tool` waits for it, so that is when the driver dies) and leads its own process
/// group. As root it also runs under `unshare --pid --mount --kill-child`: its own PID and
/// mount namespaces, which the kernel tears down (every process killed, every mount gone,
/// e.g. mmdebstrap's /proc, /sys and /dev/pts in the chroot) once `unshare` dies.
fn guarded(cmd: &Command) -> Command {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut out = if root && crate::tools::find_program("unshare").is_some() {
        let mut c = Command::new("unshare");
        c.args([
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--mount",
            "--propagation",
            "private",
            "--",
        ])
        .arg(cmd.get_program());
        c
    } else {
        Command::new(cmd.get_program())
    };
    out.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => out.env(key, value),
            None => out.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    vmrig_vm::process::die_with_parent(&mut out, true);
    out
}

fn forward(stream: impl std::io::Read, tx: std::sync::mpsc::Sender<String>) {
    for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        if tx.send(line).is_err() {
            break;
        }
    }
}

/// The command as a copy-pasteable line, for error messages.
pub fn render(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    shell_words_join(&words)
}

fn shell_words_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@".contains(&b))
            {
                w.clone()
            } else {
                vmrig_vm::backdoor::shell_quote(w)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether vmrig runs as root (root mode builds) or as a normal user (unshare mode).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` as root of a user namespace whose ids are the caller's first subordinate
/// range (`/etc/subuid`, `/etc/subgid`) from 0, the same map as mmdebstrap's unshare mode:
/// a tree mmdebstrap left is seen with its real owners (root is 0), and new files belong to
/// the first subordinate id. The caller's own id is not mapped.
pub fn as_mapped_root(program: &Path) -> Command {
    let mut cmd = Command::new(unshare());
    cmd.args(["--map-auto", "--setuid", "0", "--setgid", "0", "--"])
        .arg(program);
    cmd
}

/// [`as_mapped_root`] in its own mount and PID namespaces as well: it may mount (`/proc`,
/// `/dev` in a chroot), and every mount and process goes when it ends. (As root,
/// [`run_tool`] gives every tool those namespaces.)
pub fn as_mapped_root_with_mounts(program: &Path) -> Command {
    let mut cmd = Command::new(unshare());
    cmd.args(["--map-auto", "--setuid", "0", "--setgid", "0"])
        .args(["--mount", "--propagation", "private"])
        .args(["--pid", "--fork", "--kill-child=SIGKILL", "--"])
        .arg(program);
    cmd
}

/// `program` as root of a user namespace where root is the caller and the subordinate ids
/// follow from 1: it may change or remove anything the caller or its subordinate ids own,
/// and what it makes or chowns to 0 belongs to the caller.
pub fn as_owner(program: &Path) -> Command {
    let mut cmd = Command::new(unshare());
    cmd.args(["--map-root-user", "--map-auto", "--"])
        .arg(program);
    cmd
}

fn unshare() -> PathBuf {
    crate::tools::find_program("unshare").unwrap_or_else(|| "unshare".into())
}

/// Gives everything under `dir` to the caller (a no-op as root): what mmdebstrap unpacked in
/// unshare mode belongs to subordinate ids, which the caller can neither move nor remove.
pub fn reclaim(dir: &Path, step: &str, observer: &dyn BuildObserver) -> Result<(), ImageError> {
    if is_root() {
        return Ok(());
    }
    let mut chown = as_owner(Path::new("chown"));
    chown.args(["-R", "--no-dereference", "0:0"]).arg(dir);
    run_tool(&mut chown, step, observer).map(|_| ())
}

/// Where a build as a normal user lets mmdebstrap work (its `TMPDIR` and target): a
/// directory the namespace's root (a subordinate id, not the caller) can reach. That is the
/// build's own directory when every directory above it is searchable by others (a home of
/// mode 0755), else a new directory in `$TMPDIR`, `/var/tmp` or `/tmp` (homes of mode
/// 0700/0750). Removed, whoever owns what is in it, when dropped.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Also checks first that user namespaces work, so a host that lacks them gets one line
    /// naming the fix, not mmdebstrap's own error.
    pub fn new(out: &Path) -> Result<Scratch, ImageError> {
        if let Some(problem) = crate::tools::userns_problems().into_iter().next() {
            return Err(ImageError::Unprivileged(problem.to_string()));
        }
        use std::os::unix::fs::PermissionsExt;
        let io = |what: &str, p: &Path| ImageError::io(format!("{what} {}", p.display()));
        // The store made `out` 0700; its contents are not secret (0755 once published).
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
            .map_err(io("opening up", out))?;
        let base = if searchable_by_others(out) {
            out.to_path_buf()
        } else {
            let candidates = std::env::var_os("TMPDIR")
                .filter(|t| Path::new(t).is_absolute())
                .map(PathBuf::from)
                .into_iter()
                .chain(["/var/tmp", "/tmp"].map(PathBuf::from));
            candidates
                .filter(|c| c.is_dir())
                .find(|c| searchable_by_others(c))
                .ok_or_else(|| {
                    ImageError::Unprivileged(format!(
                        "no directory for mmdebstrap's unshare mode: {} and $TMPDIR, /var/tmp \
                         and /tmp are not searchable by other users; run `chmod o+x` on the \
                         directories above the store or set TMPDIR to one that is",
                        out.display()
                    ))
                })?
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("vmrig-scratch-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&dir).map_err(io("creating", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of", &dir))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = vmrig_store::remove_all(&self.dir);
    }
}

/// Every directory from `/` to `dir` is searchable (x) by users other than its owner.
fn searchable_by_others(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    dir.ancestors().all(|d| {
        std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 != 0)
    })
}

/// Moves `from` to `to`, copying (then removing `from`) across file systems.
pub fn move_path(from: &Path, to: &Path) -> Result<(), ImageError> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let status = vmrig_vm::process::command("cp")
                .args(["-a", "--sparse=always", "--reflink=auto"])
                .arg(from)
                .arg(to)
                .status()
                .map_err(ImageError::io("running cp"))?;
            if !status.success() {
                return Err(ImageError::Io {
                    context: format!("copying {} to {}", from.display(), to.display()),
                    source: std::io::Error::other(status.to_string()),
                });
            }
            vmrig_store::remove_all(from)
                .map_err(ImageError::io(format!("removing {}", from.display())))
        }
        other => other.map_err(ImageError::io(format!(
            "moving {} to {}",
            from.display(),
            to.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_ran_out_of_space_is_its_own_kind() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'I: extracting'; echo \"gpg: error writing to '/x/y': No space left on device\" >&2; exit 25",
        ]);
        let err = run_tool(&mut cmd, "test", &crate::Quiet).unwrap_err();
        // Shown as any failed tool.
        assert!(
            err.to_string().starts_with("`sh -c ")
                && err.to_string().contains("(exit status: 25):\n"),
            "{err}"
        );
        match &err {
            ImageError::ToolDiskFull { path, .. } => {
                assert_eq!(path.as_deref(), Some(Path::new("/x/y")))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.disk_full(),
            Some(vmrig_store::DiskFull::at(Path::new("/x/y")))
        );

        let quota = tool_error(
            "mke2fs".into(),
            "exit status: 1".into(),
            vec!["mke2fs: Disk quota exceeded while writing".into()],
        );
        assert_eq!(quota.disk_full(), Some(vmrig_store::DiskFull::default()));

        let other = tool_error(
            "apt".into(),
            "exit status: 100".into(),
            vec!["E: Unable to locate package nosuchpkg".into()],
        );
        assert!(matches!(other, ImageError::Tool { .. }), "{other:?}");
        assert_eq!(other.disk_full(), None);
    }

    #[test]
    fn an_io_error_of_a_full_disk_is_one_by_its_kind() {
        let full =
            ImageError::io("writing the initrd")(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.disk_full(), Some(vmrig_store::DiskFull::default()));
        let denied =
            ImageError::io("writing the initrd")(std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(denied.disk_full(), None);
        let store = ImageError::Store(vmrig_store::StoreError::Sync {
            path: "/s/.tmp/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(
            store.disk_full(),
            Some(vmrig_store::DiskFull::at(Path::new("/s/.tmp/x")))
        );
    }
}
