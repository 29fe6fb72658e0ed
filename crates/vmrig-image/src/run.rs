//! Running a build tool with its output streamed to the observer and its tail kept for errors.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
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
        Err(ImageError::Tool {
            command: rendered,
            status: status.to_string(),
            output: tail.join("\n"),
            lines: tail,
        })
    }
}

/// `cmd`, made to die with this process, with everything it started and everything it
/// mounted. Its first process gets SIGKILL when the calling thread ends (PR_SET_PDEATHSIG;
/// `run_tool` waits for it, so that is when the driver dies) and leads its own process
/// group. As root it also runs under `unshare --pid --mount --kill-child`: its own PID and
/// mount namespaces, which the kernel tears down (every process killed, every mount gone,
/// e.g. mmdebstrap's /proc, /sys and /dev/pts in the chroot) once `unshare` dies.
fn guarded(cmd: &Command) -> Command {
    use std::os::unix::process::CommandExt;
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
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid, _exit).
    unsafe {
        out.pre_exec(move || {
            libc::setpgid(0, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The driver may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
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
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
