//! The backdoor framing against fake guests on a socket pair: a real bash (the same
//! program that runs in the guest) and scripted misbehaving guests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmrig_vm::backdoor::{Framing, Shell, ShellError, BANNER};

fn soon(secs: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(secs))
}

/// A host shell wired like the guest's: bash reading commands from the socket.
fn bash_guest() -> (Shell<UnixStream>, std::process::Child) {
    bash_guest_with(&[])
}

/// [`bash_guest`] with extra environment variables for the guest shell.
fn bash_guest_with(env: &[(&str, &str)]) -> (Shell<UnixStream>, std::process::Child) {
    let (host, guest) = UnixStream::pair().unwrap();
    let guest_out = guest.try_clone().unwrap();
    let mut command = Command::new("bash");
    command
        .args([
            "--norc",
            "-c",
            &format!("echo '{BANNER}'; exec bash --norc"),
        ])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(guest)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(guest_out)))
        .stderr(Stdio::null())
        .envs(env.iter().copied());
    // Without the test runner's terminal, as the guest's shell after RELEASE_TERMINAL.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let mut shell = Shell::new(host);
    if let Err(e) = shell.wait_for_banner(Instant::now() + Duration::from_secs(10)) {
        let _ = child.kill();
        panic!("{e}");
    }
    (shell, child)
}

#[test]
fn real_bash_runs_commands_with_status_and_output() {
    let (mut shell, mut child) = bash_guest();
    let out = shell.run("echo hello; exit 3", soon(10)).unwrap();
    assert_eq!((out.status, out.text()), (3, "hello\n".into()));
    let out = shell.run("printf '%s' \"it's quoted\"", soon(10)).unwrap();
    assert_eq!(out.text(), "it's quoted");
    let out = shell.run("echo one\necho two", soon(10)).unwrap();
    assert_eq!(out.text(), "one\ntwo\n");
    // Reading stdin gets EOF instead of the driver's next command.
    let out = shell.run("cat; echo after", soon(10)).unwrap();
    assert_eq!(out.text(), "after\n");
    let _ = child.kill();
}

#[test]
fn real_bash_text_framing_keeps_every_byte_but_nul() {
    let (mut shell, mut child) = bash_guest();
    let cases: &[(&str, i32, &[u8])] = &[
        ("printf 'a\\\\b\\n\\n\\n'", 0, b"a\\b\n\n\n"),
        ("printf 'cr\\r\\nT 0 5\\n'; exit 7", 7, b"cr\r\nT 0 5\n"),
        (
            "printf '\\xc3\\xa9\\xff\\x1f\\x1f'",
            0,
            b"\xc3\xa9\xff\x1f\x1f",
        ),
        ("echo x; false", 1, b"x\n"),
        (
            "LC_ALL=C.UTF-8; export LANG=C.UTF-8; printf '\\xc3\\xa9'",
            0,
            b"\xc3\xa9",
        ),
        ("", 0, b""),
        // A command that replaces the EXIT trap still gets its output, but loses its
        // trailing newlines (documented).
        ("trap 'echo mine' EXIT; echo body", 0, b"body\nmine"),
    ];
    for (cmd, status, stdout) in cases {
        let out = shell.run(cmd, soon(10)).unwrap();
        assert_eq!(
            (out.status, out.stdout.as_slice()),
            (*status, *stdout),
            "{cmd}"
        );
    }
    let out = shell.run("echo ${LC_ALL-unset}", soon(10)).unwrap();
    assert_eq!(out.text(), "unset\n");
    let _ = child.kill();
    // In a UTF-8 shell the length is still counted in bytes, and the locale is restored.
    let (mut shell, mut child) = bash_guest_with(&[("LC_ALL", "C.UTF-8")]);
    let out = shell
        .run("printf '\\xc3\\xa9\\xc3\\xa9'", soon(10))
        .unwrap();
    assert_eq!(out.text(), "\u{e9}\u{e9}");
    let out = shell.run("echo $LC_ALL", soon(10)).unwrap();
    assert_eq!(out.text(), "C.UTF-8\n");
    let _ = child.kill();
}

#[test]
fn real_bash_huge_and_binary_output() {
    let (mut shell, mut child) = bash_guest();
    let exact = Framing::Exact;
    let out = shell
        .run_framed("head -c 20000000 /dev/zero", exact, soon(60))
        .unwrap();
    assert_eq!(out.stdout.len(), 20_000_000);
    let out = shell
        .run_framed("printf '\\xff\\x00\\xfe'", exact, soon(10))
        .unwrap();
    assert_eq!(out.stdout, vec![0xff, 0, 0xfe]);
    assert_eq!(out.text(), "\u{fffd}\0\u{fffd}");
    // Text framing: every byte but NUL, and big outputs too.
    let out = shell
        .run("head -c 3000000 /dev/zero | tr '\\0' x", soon(60))
        .unwrap();
    assert_eq!(out.stdout, vec![b'x'; 3_000_000]);
    let out = shell.run("printf '\\xff\\x00\\xfe'", soon(10)).unwrap();
    assert_eq!(out.stdout, vec![0xff, 0xfe], "bash drops NUL bytes");
    let _ = child.kill();
}

/// A scripted guest: answers each command line with `reply`, written in small pieces.
fn scripted_guest(reply: &'static [u8], chunk: usize) -> Shell<UnixStream> {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut writer = guest.try_clone().unwrap();
        writer.write_all(b"noise before the banner\n").unwrap();
        writer.write_all(format!("{BANNER}\n").as_bytes()).unwrap();
        let mut reader = BufReader::new(guest);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            for piece in reply.chunks(chunk) {
                if writer.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            line.clear();
        }
    });
    let mut shell = Shell::new(host);
    shell
        .wait_for_banner(Instant::now() + Duration::from_secs(5))
        .unwrap();
    shell
}

#[test]
fn replies_split_into_single_bytes_are_reassembled() {
    let mut shell = scripted_guest(b"T 0 6\nhello\n\n", 1);
    let out = shell.run("x", soon(10)).unwrap();
    assert_eq!(out.text(), "hello\n");
    let mut shell = scripted_guest(b"B aGVsbG8K 0\n", 1);
    let out = shell.run_framed("x", Framing::Exact, soon(10)).unwrap();
    assert_eq!(out.text(), "hello\n");
}

#[test]
fn guest_closing_mid_reply_is_an_error() {
    let (host, guest) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut g = guest;
        g.write_all(format!("{BANNER}\nT 0 10\nhel").as_bytes())
            .unwrap();
    });
    let mut shell = Shell::new(host);
    shell
        .wait_for_banner(Instant::now() + Duration::from_secs(5))
        .unwrap();
    t.join().unwrap();
    assert!(matches!(shell.run("x", soon(5)), Err(ShellError::Closed)));
}

#[test]
fn silent_guest_times_out_and_the_shell_is_then_busy() {
    let (host, guest) = UnixStream::pair().unwrap();
    let mut g = guest.try_clone().unwrap();
    g.write_all(format!("{BANNER}\n").as_bytes()).unwrap();
    let mut shell = Shell::new(host);
    shell
        .wait_for_banner(Instant::now() + Duration::from_secs(5))
        .unwrap();
    let err = shell
        .run(
            "sleep 1000",
            Some(Instant::now() + Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(err, ShellError::Timeout(_)), "{err}");
    assert!(matches!(
        shell.run("true", soon(1)),
        Err(ShellError::Busy(_))
    ));
    drop(guest);
}

#[test]
fn endless_line_without_newline_is_bounded_by_the_deadline() {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut g = guest;
        let _ = g.write_all(format!("{BANNER}\nB ").as_bytes());
        let junk = vec![b'A'; 64 * 1024];
        let stop = Instant::now() + Duration::from_secs(3);
        while Instant::now() < stop && g.write_all(&junk).is_ok() {}
    });
    let mut shell = Shell::new(host);
    shell
        .wait_for_banner(Instant::now() + Duration::from_secs(5))
        .unwrap();
    let err = shell
        .run("x", Some(Instant::now() + Duration::from_millis(300)))
        .unwrap_err();
    assert!(matches!(err, ShellError::Timeout(_)), "{err}");
}

#[test]
fn banner_wait_is_bounded() {
    let (host, _guest) = UnixStream::pair().unwrap();
    let mut shell = Shell::new(host);
    let err = shell
        .wait_for_banner(Instant::now() + Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(err, ShellError::Timeout(_)));
}

#[test]
fn shell_recovers_once_a_timed_out_command_finishes() {
    let (mut shell, mut child) = bash_guest();
    let err = shell
        .run(
            "sleep 0.5; echo late",
            Some(Instant::now() + Duration::from_millis(100)),
        )
        .unwrap_err();
    assert!(matches!(err, ShellError::Timeout(_)), "{err}");
    assert!(matches!(
        shell.run("true", Some(Instant::now())),
        Err(ShellError::Busy(_))
    ));
    std::thread::sleep(Duration::from_millis(800));
    let out = shell.run("echo fresh", soon(10)).unwrap();
    assert_eq!(out.text(), "fresh\n");
    let _ = child.kill();
}

#[test]
fn many_short_lines_before_the_banner_cost_linear_time() {
    let (host, guest) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        let mut g = guest;
        let noise = vec![b'\n'; 8 * 1024 * 1024];
        g.write_all(&noise).unwrap();
        g.write_all(format!("{BANNER}\n").as_bytes()).unwrap();
        g
    });
    let mut shell = Shell::new(host);
    let started = Instant::now();
    shell
        .wait_for_banner(Instant::now() + Duration::from_secs(60))
        .unwrap();
    // Per-line draining took minutes for this in a debug build; a linear scan, well under 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(writer.join().unwrap());
}

#[test]
fn real_bash_commands_read_their_input_after_the_line() {
    let (mut shell, mut child) = bash_guest();
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = shell.run_with_input("wc -c", &input, soon(60)).unwrap();
    assert_eq!(out.text().trim(), "3000000");
    // Input with newlines and what looks like commands is data, not commands.
    let out = shell
        .run_with_input("cat", b"echo not run\nexit 7\n", soon(10))
        .unwrap();
    assert_eq!(
        (out.status, out.text()),
        (0, "echo not run\nexit 7\n".into())
    );
    let out = shell
        .run_with_input("cat >/dev/null; exit 4", b"", soon(10))
        .unwrap();
    assert_eq!(out.status, 4);
    // The shell goes on with the next command line.
    let out = shell.run("echo next", soon(10)).unwrap();
    assert_eq!(out.text(), "next\n");
    let _ = child.kill();
}

/// A time limit is enforced in the guest: the command (and what it started) is killed,
/// the reply has status 124 and the output written until then, and the shell is free at
/// once, for a command that traps TERM too (KILL follows).
#[test]
fn real_bash_kills_a_command_at_its_time_limit_and_stays_usable() {
    let (mut shell, mut child) = bash_guest();
    let limit = Some(Duration::from_millis(500));
    let started = Instant::now();
    let out = shell
        .run_limited("echo early; sleep 600 & sleep 600", limit, soon(10))
        .unwrap();
    assert_eq!((out.status, out.text()), (124, "early\n".into()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let out = shell.run("echo next", soon(5)).unwrap();
    assert_eq!((out.status, out.text()), (0, "next\n".into()));
    // The background sleep of the killed command is gone too (once the signal is in).
    let out = shell
        .run(
            "for i in $(seq 50); do pgrep -f '^sleep 600$' >/dev/null || { echo none; exit; }; sleep 0.1; done",
            soon(10),
        )
        .unwrap();
    assert_eq!(out.text(), "none\n");

    // A command that `exec`s keeps its limit (the exec'd program does not hold the
    // watchdog's pipe; the command's group, outside the subshell it ran in, does).
    for command in [
        "exec sleep 600 >/dev/null",
        "echo a >/dev/null; exec sleep 600",
    ] {
        let started = Instant::now();
        let out = shell.run_limited(command, limit, soon(10)).unwrap();
        assert_eq!(out.status, 124, "{command}");
        assert!(started.elapsed() < Duration::from_secs(5), "{command}");
    }

    let started = Instant::now();
    let out = shell
        .run_limited("trap '' TERM; while :; do :; done", limit, soon(10))
        .unwrap();
    assert_eq!(out.status, 124);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // Within the limit: status, output (trailing newlines too) and `exit` as without one.
    let out = shell
        .run_limited("printf 'a\\n\\n'; exit 3", limit, soon(10))
        .unwrap();
    assert_eq!((out.status, out.text()), (3, "a\n\n".into()));
    // A command that fails under `set -e` ends the job with the marker written once.
    let out = shell
        .run_limited("set -euo pipefail; echo -n hi; false", limit, soon(10))
        .unwrap();
    assert_eq!((out.status, out.text()), (1, "hi".into()));
    let out = shell
        .run_limited("set -euo pipefail; echo -n hi; exit 3", limit, soon(10))
        .unwrap();
    assert_eq!((out.status, out.text()), (3, "hi".into()));
    let out = shell
        .run_limited("true", Some(Duration::ZERO), soon(10))
        .unwrap();
    assert_eq!(out.status, 0, "a zero limit is no limit");
    let _ = child.kill();
}

/// A detached command's reply is read (and dropped) before the next command's.
#[test]
fn real_bash_detached_command_does_not_desynchronise_the_replies() {
    let (mut shell, mut child) = bash_guest();
    shell
        .send_detached(
            "sleep 0.3; echo detached",
            None,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
    let out = shell.run("echo mine", soon(10)).unwrap();
    assert_eq!(out.text(), "mine\n");
    let _ = child.kill();
}

/// Without a controlling terminal (as here) the release line changes nothing and the
/// shell goes on answering.
#[test]
fn real_bash_release_terminal_without_a_terminal_keeps_the_shell() {
    let (mut shell, mut child) = bash_guest();
    shell
        .release_terminal(Instant::now() + Duration::from_secs(10))
        .unwrap();
    let out = shell.run("echo $$ still", soon(10)).unwrap();
    assert!(out.text().ends_with(" still\n"), "{}", out.text());
    // The shell now has the sleep descriptor; watchdogs sleep on it, commands do not see it.
    let out = shell
        .run("test -e /dev/fd/7 && echo open", soon(10))
        .unwrap();
    assert_eq!(out.text(), "");
    let started = Instant::now();
    let out = shell
        .run_limited("sleep 600", Some(Duration::from_millis(300)), soon(10))
        .unwrap();
    assert_eq!(out.status, 124);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let out = shell
        .run_limited(
            "sleep 0.2; echo in time",
            Some(Duration::from_secs(5)),
            soon(10),
        )
        .unwrap();
    assert_eq!((out.status, out.text()), (0, "in time\n".into()));
    // `exit` and `set -e` end the command's job with one marker (it drops the EXIT trap).
    for (command, status) in [("exit 3", 3), ("false", 1), ("(exit 5)", 5)] {
        let command = format!("set -euo pipefail; echo -n hi; {command}");
        let out = shell
            .run_limited(&command, Some(Duration::from_secs(5)), soon(10))
            .unwrap();
        assert_eq!((out.status, out.text()), (status, "hi".into()), "{command}");
    }
    let _ = child.kill();
}

/// A background job that keeps stdout open (upstream's succeed-stdout-warning test): the
/// reply waits for it and carries what it wrote after the command ended, without the
/// framing's marker in the middle.
#[test]
fn real_bash_output_written_after_the_command_ended_has_no_marker() {
    let (mut shell, mut child) = bash_guest();
    let plain = shell
        .run("(echo ONE; sleep 1; echo TWO) &", soon(10))
        .unwrap();
    let limited = shell
        .run_limited(
            "(echo ONE; sleep 1; echo TWO) &",
            Some(Duration::from_secs(30)),
            soon(10),
        )
        .unwrap();
    for out in [plain, limited] {
        assert_eq!(out.status, 0);
        assert!(!out.stdout.contains(&0x1f), "{:?}", out.text());
        assert_eq!(out.text(), "ONE\nTWO\n");
    }
    let out = shell.run("echo next", soon(5)).unwrap();
    assert_eq!(out.text(), "next\n");
    let _ = child.kill();
}

/// A background job whose stdout goes elsewhere (how tests start servers: `cmd >&2 &`) is
/// not waited for, and a job's failure does not change the command's status, even under
/// `set -e`.
#[test]
fn real_bash_background_jobs_without_stdout_are_not_waited_for() {
    let (mut shell, mut child) = bash_guest();
    for limit in [None, Some(Duration::from_secs(30))] {
        let start = Instant::now();
        let out = shell
            .run_limited("sleep 60 >&2 & echo started", limit, soon(10))
            .unwrap();
        assert_eq!((out.status, out.text()), (0, "started\n".into()));
        assert!(start.elapsed() < Duration::from_secs(5), "{limit:?}");
        let out = shell
            .run_limited(
                "set -e; (sleep 0.2; exit 7) & echo a; exit 3",
                limit,
                soon(10),
            )
            .unwrap();
        assert_eq!((out.status, out.text()), (3, "a\n".into()), "{limit:?}");
    }
    let out = shell
        .run_with_input("(cat; sleep 0.3; echo late) &", b"in\n", soon(10))
        .unwrap();
    assert_eq!(out.text(), "in\nlate\n");
    let _ = child.kill();
    let _ = std::process::Command::new("pkill")
        .args(["-f", "^sleep 60$"])
        .status();
}

/// Upstream's files and nfs tests: a background job, then at once time-limited polls. A
/// watchdog killed by TERM could miss the signal (bash caught it just before its `read -t`
/// began) and sleep its whole limit: this hung within 300 rounds on a busy host.
#[test]
fn real_bash_polls_right_after_a_background_job_are_answered() {
    let (mut shell, mut child) = bash_guest();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    for i in 0..50 {
        let start = shell
            .run(
                &format!(
                    "(sleep 0.$((RANDOM % 3)) && touch {}) >&2 &",
                    file.display()
                ),
                soon(10),
            )
            .unwrap();
        assert_eq!(start.status, 0);
        let mut tries = 0;
        loop {
            let out = shell
                .run_limited(
                    &format!("test -e {}", file.display()),
                    Some(Duration::from_secs(60)),
                    soon(10),
                )
                .unwrap_or_else(|e| panic!("round {i}, try {tries}: {e}"));
            if out.status == 0 {
                break;
            }
            tries += 1;
        }
        std::fs::remove_file(&file).unwrap();
    }
    let _ = child.kill();
}
