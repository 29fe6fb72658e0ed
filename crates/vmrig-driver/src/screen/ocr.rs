//! OCR with the host's `tesseract`: one process per image, bounded by a deadline, a few at
//! a time, stopping (and killing the rest) as soon as a result satisfies the caller.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// How to get tesseract on Debian and Ubuntu.
pub const INSTALL: &str = "sudo apt-get install tesseract-ocr tesseract-ocr-eng";

/// The `tesseract` program on `path` (the value of `$PATH`), or why there is none.
pub fn find_tesseract(path: Option<&OsStr>) -> Result<PathBuf, String> {
    let dirs = path.map(std::env::split_paths).into_iter().flatten();
    vmrig_vm::process::find_program_in("tesseract", dirs).ok_or_else(|| {
        format!(
        "OCR needs `tesseract` on the host, and there is none on PATH; install it with `{INSTALL}`"
    )
    })
}

/// One image to read.
pub struct Job {
    /// Variant name, for logs.
    pub name: &'static str,
    pub image: PathBuf,
}

/// What a run gave.
pub enum Outcome {
    /// Every job's text, in completion order: no result satisfied `stop`.
    All(Vec<(&'static str, String)>),
    /// `stop` accepted this result; the other jobs were killed or never started.
    Stopped(&'static str, String),
    /// The deadline came first: the texts read until then (the rest were killed).
    TimedOut(Vec<(&'static str, String)>),
}

struct Running {
    name: &'static str,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs tesseract on each job (`jobs` is pulled lazily, so preparing a job can wait until
/// the earlier ones have been read), `parallel` at a time; `stop(name, text)` returning true
/// ends the run at once. When `deadline` passes first, the texts read so far come back as
/// [`Outcome::TimedOut`]; nothing outlives the call.
pub fn run(
    tesseract: &Path,
    jobs: impl IntoIterator<Item = Result<Job, String>>,
    parallel: usize,
    deadline: Instant,
    mut stop: impl FnMut(&str, &str) -> bool,
) -> Result<Outcome, String> {
    let mut jobs = jobs.into_iter();
    let mut running: Vec<Running> = Vec::new();
    let mut done = Vec::new();
    let mut exhausted = false;
    loop {
        while !exhausted && running.len() < parallel.max(1) {
            match jobs.next() {
                Some(job) => running.push(spawn(tesseract, job?)?),
                None => exhausted = true,
            }
        }
        if running.is_empty() {
            return Ok(Outcome::All(done));
        }
        let mut finished = None;
        for (i, r) in running.iter_mut().enumerate() {
            if let Some(status) = r
                .child
                .try_wait()
                .map_err(|e| format!("waiting for tesseract: {e}"))?
            {
                finished = Some((i, status));
                break;
            }
        }
        match finished {
            Some((i, status)) => {
                let r = running.remove(i);
                let text = std::fs::read_to_string(&r.out).unwrap_or_default();
                if !status.success() {
                    let err = std::fs::read_to_string(&r.err).unwrap_or_default();
                    return Err(tesseract_failed(status.code(), &err));
                }
                if stop(r.name, &text) {
                    return Ok(Outcome::Stopped(r.name, text));
                }
                done.push((r.name, text));
            }
            None => {
                if Instant::now() >= deadline {
                    return Ok(Outcome::TimedOut(done));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn spawn(tesseract: &Path, job: Job) -> Result<Running, String> {
    let out = job.image.with_extension("txt");
    let err = job.image.with_extension("err");
    let create = |p: &Path| File::create(p).map_err(|e| format!("creating {}: {e}", p.display()));
    let child = vmrig_vm::process::command(tesseract)
        .arg(&job.image)
        .args(["-", "--psm", "11", "-c", "debug_file=/dev/null"])
        // Several processes may run at once next to the VMs: one thread each.
        .env("OMP_THREAD_LIMIT", "1")
        .stdin(Stdio::null())
        .stdout(create(&out)?)
        .stderr(create(&err)?)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", tesseract.display()))?;
    Ok(Running {
        name: job.name,
        child,
        out,
        err,
    })
}

fn tesseract_failed(code: Option<i32>, stderr: &str) -> String {
    let stderr = stderr.trim();
    let hint = if stderr.contains("Failed loading language") || stderr.contains("traineddata") {
        format!(" (the English model is missing: `{INSTALL}`)")
    } else {
        String::new()
    };
    format!(
        "tesseract failed (exit code {}){hint}: {stderr}",
        code.map_or_else(|| "none".to_owned(), |c| c.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake(dir: &Path, script: &str) -> PathBuf {
        let path = dir.join("tesseract");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn jobs(dir: &Path, names: &[&'static str]) -> Vec<Result<Job, String>> {
        names
            .iter()
            .map(|n| {
                Ok(Job {
                    name: n,
                    image: dir.join(format!("{n}.pgm")),
                })
            })
            .collect()
    }

    #[test]
    fn missing_tesseract_names_the_apt_get_command() {
        let empty = tempfile::tempdir().unwrap();
        let e = find_tesseract(Some(empty.path().as_os_str())).unwrap_err();
        assert!(
            e.contains("apt-get install tesseract-ocr tesseract-ocr-eng"),
            "{e}"
        );
        assert!(find_tesseract(None).is_err());
        // A file that is not executable does not count.
        std::fs::write(empty.path().join("tesseract"), "").unwrap();
        assert!(find_tesseract(Some(empty.path().as_os_str())).is_err());
        let dir = tempfile::tempdir().unwrap();
        let t = fake(dir.path(), "true");
        let path = std::env::join_paths([empty.path(), dir.path()]).unwrap();
        assert_eq!(find_tesseract(Some(&path)).unwrap(), t);
    }

    #[test]
    fn stops_at_the_first_satisfying_result_and_kills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        // "slow" sleeps; the others print their image's name.
        let t = fake(
            dir.path(),
            r#"case "$1" in *slow*) sleep 30;; esac; echo "text of $(basename "$1")""#,
        );
        let started = Instant::now();
        let outcome = run(
            &t,
            jobs(dir.path(), &["slow", "raw", "gray"]),
            2,
            Instant::now() + Duration::from_secs(20),
            |_, text| text.contains("raw"),
        )
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        match outcome {
            Outcome::Stopped(name, text) => {
                assert_eq!(name, "raw");
                assert_eq!(text.trim(), "text of raw.pgm");
            }
            _ => panic!("should have stopped"),
        }
        let all = run(
            &t,
            jobs(dir.path(), &["a", "b", "c"]),
            1,
            Instant::now() + Duration::from_secs(20),
            |_, _| false,
        )
        .unwrap();
        match all {
            Outcome::All(texts) => {
                let names: Vec<_> = texts.iter().map(|t| t.0).collect();
                assert_eq!(names, ["a", "b", "c"]);
            }
            _ => panic!("nothing satisfies"),
        }
    }

    #[test]
    fn the_deadline_bounds_a_run_and_failures_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let t = fake(dir.path(), "sleep 30");
        let started = Instant::now();
        let outcome = run(
            &t,
            jobs(dir.path(), &["raw"]),
            1,
            Instant::now() + Duration::from_millis(300),
            |_, _| true,
        )
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(outcome, Outcome::TimedOut(ref done) if done.is_empty()));

        let t = fake(
            dir.path(),
            "echo \"Failed loading language 'eng'\" >&2; exit 1",
        );
        let e = match run(
            &t,
            jobs(dir.path(), &["raw"]),
            1,
            Instant::now() + Duration::from_secs(10),
            |_, _| true,
        ) {
            Err(e) => e,
            Ok(_) => panic!("should fail"),
        };
        assert!(
            e.contains("exit code 1") && e.contains("tesseract-ocr-eng"),
            "{e}"
        );
    }
}
