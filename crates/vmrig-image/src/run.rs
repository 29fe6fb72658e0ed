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
