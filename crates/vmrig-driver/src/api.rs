//! The NixOS machine API on top of [`Machine::execute`]: succeed/fail, the waits, units.
//!
//! Upstream semantics (nixos/lib/test-driver, machine/__init__.py), with its quirks fixed:
//! each attempt of a wait is bounded by the time left (not by the whole budget), waits poll
//! quickly at first (100 ms, growing to 1 s) instead of once a second, every wait has an
//! upper bound (the global timeout at most), and arguments are shell-quoted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vmrig_vm::backdoor::shell_quote;

use crate::machine::Machine;
use crate::ApiError;

/// The least time one attempt of a polling wait gets, even at the end of the wait: a quick
/// command cut off by the wait's deadline would keep running and leave the machine's shell
/// busy (every next command failing with `MachineError`) until its late reply came.
const MIN_ATTEMPT: f64 = 2.0;
/// Output shown in a failure message.
const OUTPUT_EXCERPT: usize = 4000;

/// Upstream's text for a wait that ran out of time (`retry`), which tests assert on;
/// vmrig adds what was awaited after it.
pub fn timed_out_text(elapsed: f64, timeout: f64) -> String {
    format!(
        "action timed out after {elapsed:.2} seconds (timeout={})",
        python_number(timeout)
    )
}

/// A number as Python prints it: `900` for an integral value, else `2.5`.
pub fn python_number(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn excerpt(output: &str) -> String {
    let trimmed = output.trim_end();
    if trimmed.is_empty() {
        return "(no output)".into();
    }
    if trimmed.len() <= OUTPUT_EXCERPT {
        return trimmed.to_owned();
    }
    let mut cut = trimmed.len() - OUTPUT_EXCERPT;
    while !trimmed.is_char_boundary(cut) {
        cut += 1;
    }
    format!("[... {cut} bytes cut ...]\n{}", &trimmed[cut..])
}

impl Machine {
    /// `succeed(*commands)`: each must exit 0; returns the concatenated output.
    pub fn succeed(
        &mut self,
        commands: &[String],
        timeout: Option<f64>,
    ) -> Result<String, ApiError> {
        let mut all = String::new();
        for command in commands {
            let logger = self.logger().clone();
            let name = self.name.clone();
            let output = logger.nested(format!("must succeed: {command}"), Some(&name), || {
                let (status, output) = self.execute_user(command, timeout)?;
                if status != 0 {
                    return Err(ApiError::Assertion(format!(
                        "command `{command}` failed (exit code {status}) on `{name}`\noutput:\n{}\nlast console lines of `{name}`:\n{}",
                        excerpt(&output),
                        vmrig_vm::machine::console_tail(self.console())
                    )));
                }
                Ok(output)
            })?;
            all.push_str(&output);
        }
        Ok(all)
    }

    /// `fail(*commands)`: each must exit non-zero.
    pub fn fail(&mut self, commands: &[String], timeout: Option<f64>) -> Result<String, ApiError> {
        let mut all = String::new();
        for command in commands {
            let logger = self.logger().clone();
            let name = self.name.clone();
            let output = logger.nested(format!("must fail: {command}"), Some(&name), || {
                let (status, output) = self.execute_user(command, timeout)?;
                if status == 0 {
                    return Err(ApiError::Assertion(format!(
                        "command `{command}` unexpectedly succeeded on `{name}`\noutput:\n{}",
                        excerpt(&output)
                    )));
                }
                Ok(output)
            })?;
            all.push_str(&output);
        }
        Ok(all)
    }

    /// Polls `attempt` until it returns `Some`, each attempt bounded by the time left (but
    /// given at least [`MIN_ATTEMPT`]). On timeout the error tells what was awaited and the
    /// last attempt's diagnosis.
    pub fn poll<T>(
        &mut self,
        what: &str,
        timeout: f64,
        mut attempt: impl FnMut(&mut Machine, f64) -> Result<Result<T, String>, ApiError>,
    ) -> Result<T, ApiError> {
        let start = Instant::now();
        let deadline = self.deadline_in(Some(timeout));
        let mut interval = Duration::from_millis(100);
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            let last = match attempt(self, left.max(MIN_ATTEMPT)) {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(diagnosis)) => diagnosis,
                Err(ApiError::Timeout(_)) if Instant::now() >= deadline => {
                    String::from("the last attempt was still running")
                }
                Err(e) => return Err(e),
            };
            if Instant::now() + interval >= deadline {
                return Err(ApiError::Timeout(format!(
                    "{} ({what} on `{}`); {last}",
                    timed_out_text(start.elapsed().as_secs_f64(), timeout),
                    self.name
                )));
            }
            std::thread::sleep(interval);
            interval = (interval * 3 / 2).min(Duration::from_secs(1));
        }
    }

    /// Retries `command` until it succeeds, for `timeout` seconds; each try is killed in the
    /// guest after `attempt_timeout` seconds (as upstream's `attempt_timeout`), which
    /// counts as a failed try.
    pub fn wait_until_succeeds(
        &mut self,
        command: &str,
        timeout: f64,
        attempt_timeout: Option<f64>,
    ) -> Result<String, ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(
            format!("waiting for success: {command}"),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for success of `{command}`"),
                    timeout,
                    |m, left| {
                        let limit = attempt_timeout.map_or(left, |a| a.min(left));
                        let (status, output) = m.execute_user(command, Some(limit))?;
                        Ok(if status == 0 {
                            Ok(output)
                        } else {
                            Err(format!(
                                "last exit code {status}, output:\n{}",
                                excerpt(&output)
                            ))
                        })
                    },
                )
            },
        )
    }

    /// Retries `command` until it fails, for `timeout` seconds; each try is killed in the
    /// guest after `attempt_timeout` seconds (as upstream's `attempt_timeout`), which
    /// counts as a failed try.
    pub fn wait_until_fails(
        &mut self,
        command: &str,
        timeout: f64,
        attempt_timeout: Option<f64>,
    ) -> Result<String, ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(
            format!("waiting for failure: {command}"),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for failure of `{command}`"),
                    timeout,
                    |m, left| {
                        let limit = attempt_timeout.map_or(left, |a| a.min(left));
                        let (status, output) = m.execute_user(command, Some(limit))?;
                        Ok(if status != 0 {
                            Ok(output)
                        } else {
                            Err(format!("it still succeeds, output:\n{}", excerpt(&output)))
                        })
                    },
                )
            },
        )
    }

    /// `systemctl(q, user)`: as root, or in `user`'s systemd instance.
    pub fn systemctl(&mut self, q: &str, user: Option<&str>) -> Result<(i32, String), ApiError> {
        let command = match user {
            Some(user) => format!(
                "su -l {} --shell /bin/sh -c {}",
                shell_quote(user),
                shell_quote(&format!(
                    "XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}"
                ))
            ),
            None => format!("systemctl {q}"),
        };
        self.execute(&command, None)
    }

    /// `systemctl show` as a map.
    pub fn get_unit_info(
        &mut self,
        unit: &str,
        user: Option<&str>,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let (status, output) =
            self.systemctl(&format!("--no-pager show {}", shell_quote(unit)), user)?;
        if status != 0 {
            return Err(ApiError::Assertion(format!(
                "retrieving systemctl info for unit \"{unit}\"{} failed with exit code {status}",
                under_user(user)
            )));
        }
        Ok(parse_properties(&output))
    }

    pub fn get_unit_property(
        &mut self,
        unit: &str,
        property: &str,
        user: Option<&str>,
    ) -> Result<String, ApiError> {
        let (status, output) = self.systemctl(
            &format!(
                "--no-pager show {} --property={}",
                shell_quote(unit),
                shell_quote(property)
            ),
            user,
        )?;
        if status != 0 {
            return Err(ApiError::Assertion(format!(
                "retrieving systemctl property \"{property}\" for unit \"{unit}\"{} failed with exit code {status}",
                under_user(user)
            )));
        }
        parse_properties(&output).remove(property).ok_or_else(|| {
            ApiError::Assertion(format!(
                "systemctl show --property \"{property}\" \"{unit}\" produced invalid output: {output}"
            ))
        })
    }

    /// Waits until `unit` is active; fails at once if it failed, or if it is inactive
    /// with no jobs pending (it will never start).
    pub fn wait_for_unit(
        &mut self,
        unit: &str,
        user: Option<&str>,
        timeout: f64,
    ) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        let who = user.map(|u| format!(" with user {u}")).unwrap_or_default();
        logger.nested(format!("waiting for unit {unit}{who}"), Some(&name), || {
            self.poll(&format!("waiting for unit `{unit}`"), timeout, |m, _| {
                let info = m.get_unit_info(unit, user)?;
                let state = info.get("ActiveState").cloned().unwrap_or_default();
                match state.as_str() {
                    "active" => Ok(Ok(())),
                    "failed" => Err(ApiError::Assertion(format!(
                        "unit \"{unit}\" reached state \"failed\"{}",
                        m.unit_log_hint(unit)
                    ))),
                    "inactive" => {
                        let (_, jobs) = m.systemctl("list-jobs --full 2>&1", user)?;
                        if jobs.contains("No jobs") {
                            let again = m.get_unit_info(unit, user)?;
                            if again.get("ActiveState").map(String::as_str) == Some("inactive") {
                                return Err(ApiError::Assertion(format!(
                                    "unit \"{unit}\" is inactive and there are no pending jobs{}",
                                    m.unit_log_hint(unit)
                                )));
                            }
                        }
                        Ok(Err(format!("unit `{unit}` is {state}")))
                    }
                    other => Ok(Err(format!("unit `{unit}` is {other}"))),
                }
            })
        })
    }

    /// The unit's last journal lines, for failure messages.
    fn unit_log_hint(&mut self, unit: &str) -> String {
        match self.execute(
            &format!("journalctl --no-pager -n 15 -u {} 2>&1", shell_quote(unit)),
            Some(10.0),
        ) {
            Ok((_, out)) if !out.trim().is_empty() => {
                format!("\njournal of {unit}:\n{}", excerpt(&out))
            }
            _ => String::new(),
        }
    }

    pub fn require_unit_state(&mut self, unit: &str, require_state: &str) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(format!("checking if unit '{unit}' has reached state '{require_state}'"), Some(&name), || {
            let info = self.get_unit_info(unit, None)?;
            let state = info.get("ActiveState").cloned().unwrap_or_default();
            if state != require_state {
                return Err(ApiError::Assertion(format!(
                    "Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
                )));
            }
            Ok(())
        })
    }

    /// Waits until `unit`'s `ActiveState` is `state` (any state, unlike `wait_for_unit`,
    /// which fails on "failed" and on an inactive unit without jobs).
    pub fn wait_for_unit_active_state(
        &mut self,
        unit: &str,
        state: &str,
        user: Option<&str>,
        timeout: f64,
    ) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        let who = user.map(|u| format!(" with user {u}")).unwrap_or_default();
        logger.nested(
            format!("waiting for unit {unit}{who} to be in state {state}"),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for unit \"{unit}\" to be in state \"{state}\""),
                    timeout,
                    |m, _| {
                        let now = m.get_unit_property(unit, "ActiveState", user)?;
                        Ok(if now == state {
                            Ok(())
                        } else {
                            Err(format!("unit \"{unit}\" is in state \"{now}\""))
                        })
                    },
                )
            },
        )
    }

    pub fn wait_for_file(&mut self, filename: &str, timeout: f64) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(
            format!("waiting for file '{filename}'"),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for file `{filename}`"),
                    timeout,
                    |m, left| {
                        // Unquoted, as upstream: the guest's shell expands globs.
                        let (status, _) =
                            m.execute_user(&format!("test -e {filename}"), Some(left))?;
                        Ok(if status == 0 {
                            Ok(())
                        } else {
                            Err("it does not exist".into())
                        })
                    },
                )
            },
        )
    }

    pub fn wait_for_port(
        &mut self,
        port: u16,
        addr: &str,
        open: bool,
        timeout: f64,
    ) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        let verb = if open { "open" } else { "closed" };
        let what = if open {
            format!("waiting for TCP port {port} on {addr}")
        } else {
            format!("waiting for TCP port {port} on {addr} to be closed")
        };
        logger.nested(what, Some(&name), || {
            self.poll(
                &format!("waiting for port {port} on {addr} to be {verb}"),
                timeout,
                |m, left| {
                    let (status, _) =
                        m.execute_user(&format!("nc -z {} {port}", shell_quote(addr)), Some(left))?;
                    Ok(if (status == 0) == open {
                        Ok(())
                    } else {
                        Err(format!("port {port} is not {verb}"))
                    })
                },
            )
        })
    }

    pub fn wait_for_open_unix_socket(
        &mut self,
        addr: &str,
        is_datagram: bool,
        timeout: f64,
    ) -> Result<(), ApiError> {
        let logger = self.logger().clone();
        let name = self.name.clone();
        let flags = if is_datagram { "-uzU" } else { "-zU" };
        logger.nested(
            format!(
                "waiting for UNIX-domain {} on '{addr}'",
                if is_datagram { "datagram" } else { "stream" }
            ),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for UNIX socket {addr}"),
                    timeout,
                    |m, left| {
                        let (status, _) = m.execute_user(
                            &format!("nc {flags} {}", shell_quote(addr)),
                            Some(left),
                        )?;
                        Ok(if status == 0 {
                            Ok(())
                        } else {
                            Err("it is not open".into())
                        })
                    },
                )
            },
        )
    }

    /// Waits for a console line matching `regex` among the lines not consumed by an
    /// earlier wait (whole lines, unlike upstream's chunk matching).
    pub fn wait_for_console_text(
        &mut self,
        regex: &str,
        timeout: Option<f64>,
    ) -> Result<(), ApiError> {
        let re = regex::Regex::new(regex)
            .map_err(|e| ApiError::Assertion(format!("invalid regex {regex:?}: {e}")))?;
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(
            format!("waiting for {regex} to appear on console"),
            Some(&name),
            || {
                let started = Instant::now();
                let deadline = self.deadline_in(timeout);
                match self
                    .console()
                    .wait_for(self.console_cursor, deadline, |line| re.is_match(line))
                {
                    Ok(index) => {
                        self.console_cursor = index + 1;
                        Ok(())
                    }
                    Err(closed) => Err(ApiError::Timeout(format!(
                        "{} waiting for {regex:?} on the console of `{name}`; last console lines:\n{}",
                        if closed {
                            "the machine stopped".to_owned()
                        } else {
                            timed_out_text(
                                started.elapsed().as_secs_f64(),
                                timeout.unwrap_or(f64::INFINITY),
                            )
                        },
                        vmrig_vm::machine::console_tail(self.console())
                    ))),
                }
            },
        )
    }
}

impl Machine {
    /// The text of virtual terminal `tty` (`/dev/vcs<tty>`, folded at the terminal width).
    pub fn get_tty_text(&mut self, tty: &str) -> Result<String, ApiError> {
        self.read_tty(tty, TTY_READ_TIMEOUT)
    }

    fn read_tty(&mut self, tty: &str, timeout: f64) -> Result<String, ApiError> {
        if !tty.chars().all(|c| c.is_ascii_digit()) || tty.is_empty() {
            return Err(ApiError::Assertion(format!(
                "tty must be a number, not {tty:?}"
            )));
        }
        // Killed in the guest if it hangs (a terminal being set up), so the shell stays free.
        let (status, output) = self.execute_limited(&tty_text_command(tty), Some(timeout))?;
        if status != 0 {
            return Err(ApiError::Assertion(format!(
                "reading /dev/vcs{tty} failed (exit code {status}; the error is on the console)"
            )));
        }
        Ok(output)
    }

    /// Polls `get_tty_text(tty)` until it matches. A read that fails (the terminal's getty
    /// is just starting, say) counts as "no match yet", as upstream, where the read's
    /// output is simply empty then.
    pub fn wait_until_tty_matches(
        &mut self,
        tty: &str,
        regexp: &str,
        timeout: f64,
    ) -> Result<(), ApiError> {
        let re = regex::Regex::new(regexp)
            .map_err(|e| ApiError::Assertion(format!("invalid regex {regexp:?}: {e}")))?;
        if !tty.chars().all(|c| c.is_ascii_digit()) || tty.is_empty() {
            return Err(ApiError::Assertion(format!(
                "tty must be a number, not {tty:?}"
            )));
        }
        let logger = self.logger().clone();
        let name = self.name.clone();
        logger.nested(
            format!("waiting for {regexp} to appear on tty {tty}"),
            Some(&name),
            || {
                self.poll(
                    &format!("waiting for {regexp:?} on tty {tty}"),
                    timeout,
                    |m, left| match m.read_tty(tty, left.min(TTY_POLL_READ_TIMEOUT)) {
                        Ok(text) if re.is_match(&text) => Ok(Ok(())),
                        Ok(text) => Ok(Err(format!("tty {tty} shows:\n{}", excerpt(&text)))),
                        // A read that hangs (opening a terminal whose getty is starting)
                        // is killed in the guest: the next try reads again.
                        Err(ApiError::Assertion(why) | ApiError::Timeout(why)) => Ok(Err(why)),
                        Err(e) => Err(e),
                    },
                )
            },
        )
    }
}

/// The longest one read of a virtual terminal may take.
const TTY_READ_TIMEOUT: f64 = 60.0;

/// The longest one read of a terminal may take while polling it: a read that hangs
/// (opening a terminal while its getty starts) is given up and retried, not waited out.
const TTY_POLL_READ_TIMEOUT: f64 = 10.0;

/// The guest command that prints virtual terminal `tty` (digits only): `/dev/vcs<tty>` folded
/// at the terminal's width. The width comes from `/dev/vcsa<tty>`'s header (its second byte)
/// rather than from `stty -F /dev/tty<tty> size` as upstream: opening the terminal races
/// with a getty starting on it (its `vhangup()` makes the `stty` fail). A terminal nothing
/// has opened yet has no `/dev/vcsa<tty>`; it is opened once (`stty`, as upstream), which
/// allocates it, and reads as a blank screen.
fn tty_text_command(tty: &str) -> String {
    tty_text_command_in("/dev", tty)
}

fn tty_text_command_in(dev: &str, tty: &str) -> String {
    format!(
        "{{ test -e {dev}/vcsa{tty} || stty -F {dev}/tty{tty} size >/dev/null; }} && w=$(od -An -tu1 -j1 -N1 {dev}/vcsa{tty}) && fold -w $((w)) {dev}/vcs{tty}"
    )
}

/// ` under user "<user>"` for a user's unit, as upstream's messages say it.
fn under_user(user: Option<&str>) -> String {
    user.map(|u| format!(" under user \"{u}\""))
        .unwrap_or_default()
}

/// Parses `Key=Value` lines (systemctl show).
pub fn parse_properties(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_values_with_equals_signs() {
        let p = parse_properties(
            "ActiveState=active\nExecStart={ path=/bin/x ; argv[]=x a=b }\n\nJunk\n",
        );
        assert_eq!(p["ActiveState"], "active");
        assert_eq!(p["ExecStart"], "{ path=/bin/x ; argv[]=x a=b }");
        assert_eq!(p.len(), 2);
    }

    /// The guest command, run by a real bash on fake `vcs`/`vcsa` files.
    #[test]
    fn tty_text_is_folded_at_the_width_in_the_vcsa_header() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().to_str().unwrap();
        // 3 rows of 5 columns; the header is rows, columns, cursor x, cursor y.
        std::fs::write(dir.path().join("vcsa7"), [3u8, 5, 0, 0]).unwrap();
        std::fs::write(dir.path().join("vcs7"), "hello     world").unwrap();
        let run = |tty: &str| {
            std::process::Command::new("bash")
                .arg("-c")
                .arg(tty_text_command_in(dev, tty))
                .stderr(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        let out = run("7");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "hello\n     \nworld"
        );
        // No such terminal: opening it fails, and so does the read.
        assert!(!run("8").status.success());
    }

    #[test]
    fn timed_out_text_is_upstreams() {
        assert_eq!(
            timed_out_text(10.04, 10.0),
            "action timed out after 10.04 seconds (timeout=10)"
        );
        assert_eq!(python_number(2.5), "2.5");
        assert_eq!(python_number(900.0), "900");
        assert_eq!(under_user(Some("alice")), " under user \"alice\"");
        assert_eq!(under_user(None), "");
    }

    #[test]
    fn long_output_is_cut_from_the_front() {
        let long = format!("{}end", "x".repeat(10_000));
        let e = excerpt(&long);
        assert!(e.starts_with("[... "));
        assert!(e.ends_with("end"));
        assert_eq!(excerpt("  \n"), "(no output)");
    }
}
