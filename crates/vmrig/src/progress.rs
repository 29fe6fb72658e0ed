//! Rendering build progress ([`BuildObserver`]) on stderr.
//!
//! On a terminal: one spinner per step with the step's name, its elapsed time and the latest
//! line of tool output, finished as `✓ kernel (…): built in 41.2s` or `✓ initramfs: cached`.
//! Otherwise (CI logs, pipes), plain lines:
//!
//! ```text
//! building kernel (linux-image-amd64, bookworm)...
//! built kernel (linux-image-amd64, bookworm) in 9.1s
//! cached: initramfs
//! ```
//!
//! With `verbose`, every tool line is printed too (above the spinners on a terminal,
//! prefixed with the step's name otherwise). `vmrig run` reuses this for its image builds and
//! may print its own lines with [`Progress::println`] so they do not tear the spinners.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmrig_image::{BuildObserver, StepOutcome};

use crate::units::format_elapsed;

/// Shows build steps on stderr; see the module documentation.
pub struct Progress {
    verbose: bool,
    fancy: Option<Fancy>,
}

struct Fancy {
    multi: MultiProgress,
    /// Spinners of steps that have started and not finished, by step name.
    running: Mutex<BTreeMap<String, ProgressBar>>,
}

impl Progress {
    /// Spinners when stderr is a terminal (and `TERM` is not `dumb`), plain lines otherwise.
    pub fn new(verbose: bool) -> Progress {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        if std::io::stderr().is_terminal() && !dumb {
            Progress::spinners(verbose)
        } else {
            Progress::plain(verbose)
        }
    }

    /// Plain lines on stderr, one per event.
    pub fn plain(verbose: bool) -> Progress {
        Progress {
            verbose,
            fancy: None,
        }
    }

    /// Spinners on stderr.
    pub fn spinners(verbose: bool) -> Progress {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        Progress {
            verbose,
            fancy: Some(Fancy {
                multi,
                running: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Prints a line on stderr without disturbing the spinners.
    pub fn println(&self, line: &str) {
        match &self.fancy {
            Some(fancy) => {
                let _ = fancy.multi.println(line);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }

    /// Marks every step still running as failed (call when a build returns an error, so the
    /// error is not printed under a live spinner). Also done on drop.
    pub fn fail_unfinished(&self) {
        if let Some(fancy) = &self.fancy {
            let running = std::mem::take(&mut *lock(&fancy.running));
            for (step, bar) in running {
                bar.set_style(done_style());
                bar.abandon_with_message(format!(
                    "✗ {step}: failed after {}",
                    format_elapsed(bar.elapsed())
                ));
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.fail_unfinished();
    }
}

impl BuildObserver for Progress {
    fn step_started(&self, step: &str) {
        match &self.fancy {
            Some(fancy) => {
                let bar = fancy.multi.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.set_prefix(step.to_owned());
                bar.enable_steady_tick(Duration::from_millis(100));
                if let Some(old) = lock(&fancy.running).insert(step.to_owned(), bar) {
                    old.finish_and_clear();
                }
            }
            None => self.println(&format!("building {step}...")),
        }
    }

    fn line(&self, step: &str, line: &str) {
        let line = clean(line);
        match &self.fancy {
            Some(fancy) => {
                if let Some(bar) = lock(&fancy.running).get(step) {
                    bar.set_message(line.clone());
                }
                // A cache's warning (unreachable, corrupt object) is shown in any case.
                if self.verbose || line.starts_with("warning: ") {
                    let _ = fancy.multi.println(format!("  {step}: {line}"));
                }
            }
            None => {
                if self.verbose || line.starts_with("warning: ") {
                    self.println(&format!("  {step}: {line}"));
                }
            }
        }
    }

    fn step_finished(&self, step: &str, outcome: StepOutcome) {
        let text = match outcome {
            StepOutcome::Built(took) => format!("built in {}", format_elapsed(took)),
            StepOutcome::Cached => "cached".to_owned(),
            StepOutcome::Fetched(took) => {
                format!("fetched from the cache in {}", format_elapsed(took))
            }
        };
        match &self.fancy {
            Some(fancy) => {
                let bar = lock(&fancy.running)
                    .remove(step)
                    .unwrap_or_else(|| fancy.multi.add(ProgressBar::new_spinner()));
                bar.set_style(done_style());
                bar.finish_with_message(format!("✓ {step}: {text}"));
            }
            None => match outcome {
                StepOutcome::Built(took) => {
                    self.println(&format!("built {step} in {}", format_elapsed(took)))
                }
                StepOutcome::Cached => self.println(&format!("cached: {step}")),
                StepOutcome::Fetched(took) => self.println(&format!(
                    "fetched {step} from the cache in {}",
                    format_elapsed(took)
                )),
            },
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {elapsed:>4.dim} {wide_msg:.dim}")
        .expect("valid template")
}

fn done_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg}").expect("valid template")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The part of a tool line that a terminal shows last (after any `\r`), without control
/// characters or escape sequences.
fn clean(line: &str) -> String {
    let line = line
        .rsplit('\r')
        .find(|s| !s.trim().is_empty())
        .unwrap_or("");
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip a CSI sequence: ESC [ params final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if c == '\t' {
            out.push(' ');
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_tool_lines() {
        assert_eq!(clean("I: downloading\tpackages"), "I: downloading packages");
        assert_eq!(clean("10%\r50%\r"), "50%");
        assert_eq!(clean("\x1b[1;31merror\x1b[0m: x"), "error: x");
    }

    #[test]
    fn observer_does_not_panic_without_start() {
        let p = Progress::plain(true);
        p.line("kernel", "a line");
        p.step_finished("initramfs", StepOutcome::Cached);
        let p = Progress::spinners(false);
        p.step_finished("initramfs", StepOutcome::Cached);
        p.step_started("kernel");
        p.line("kernel", "I: a line");
        p.fail_unfinished();
    }
}
