//! QMP client tests against a fake in-process server (no VMs), plus one test
//! against a real `qemu-system-x86_64 -M none` (skipped when not installed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmrig_vm::qmp::{Event, Qmp, QmpError, MAX_LINE_LEN};

const T: Duration = Duration::from_secs(10);
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

/// Server side of a fake QMP connection.
struct Server {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    byte_by_byte: bool,
}

impl Server {
    fn new(stream: UnixStream) -> Self {
        let writer = stream.try_clone().unwrap();
        Server {
            reader: BufReader::new(stream),
            writer,
            byte_by_byte: false,
        }
    }

    fn send_raw(&mut self, s: &str) {
        if self.byte_by_byte {
            for b in s.as_bytes() {
                self.writer.write_all(&[*b]).unwrap();
                self.writer.flush().unwrap();
            }
        } else {
            self.writer.write_all(s.as_bytes()).unwrap();
        }
    }

    fn send(&mut self, v: Value) {
        self.send_raw(&format!("{v}\r\n"));
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "client closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Greeting + qmp_capabilities exchange.
    fn greet(&mut self) {
        self.send_raw(&format!("{GREETING}\r\n"));
        let req = self.recv();
        assert_eq!(req["execute"], "qmp_capabilities");
        assert!(req.get("arguments").is_none());
        self.send(json!({"return": {}, "id": req["id"]}));
    }

    fn event(&mut self, name: &str, secs: u64, data: Value) {
        self.send(json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": secs, "microseconds": 42},
        }));
    }
}

/// Run `f` as a fake QMP server on one end of a socket pair; return the other end.
fn fake<F>(f: F) -> (UnixStream, JoinHandle<()>)
where
    F: FnOnce(Server) + Send + 'static,
{
    let (client, server) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || f(Server::new(server)));
    (client, h)
}

#[test]
fn handshake_reads_greeting() {
    let (c, h) = fake(|mut s| s.greet());
    let qmp = Qmp::handshake(c, T).unwrap();
    assert_eq!(qmp.qemu_version(), Some((7, 2, 1)));
    assert_eq!(qmp.greeting()["capabilities"][0], "oob");
    h.join().unwrap();
}

#[test]
fn handshake_rejects_non_greeting() {
    let (c, h) = fake(|mut s| s.send(json!({"return": {}})));
    let err = Qmp::handshake(c, T).unwrap_err();
    assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("greeting"), "{err}");
    h.join().unwrap();
}

#[test]
fn execute_queues_interleaved_events_in_order() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let req = s.recv();
        assert_eq!(req["execute"], "query-status");
        s.event("STOP", 1, json!({}));
        s.event("RESUME", 2, Value::Null);
        // event without data
        s.send(json!({"event": "POWERDOWN", "timestamp": {"seconds": 3, "microseconds": 4}}));
        s.send(json!({"return": {"status": "running", "running": true}, "id": req["id"]}));
        let req = s.recv();
        assert_eq!(req["execute"], "cont");
        s.event(
            "SHUTDOWN",
            5,
            json!({"guest": true, "reason": "guest-shutdown"}),
        );
        s.send(json!({"return": {}, "id": req["id"]}));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let ret = q.execute("query-status", None, T).unwrap();
    assert_eq!(ret["status"], "running");
    q.cont().unwrap();
    assert_eq!(q.queued_events(), 4);

    let e = q.next_event(T).unwrap().unwrap();
    assert_eq!(
        e,
        Event {
            name: "STOP".into(),
            data: json!({}),
            timestamp: (1, 42)
        }
    );
    assert_eq!(q.next_event(T).unwrap().unwrap().name, "RESUME");
    let e = q.next_event(T).unwrap().unwrap();
    assert_eq!(
        (e.name.as_str(), e.data.clone(), e.timestamp),
        ("POWERDOWN", Value::Null, (3, 4))
    );
    let e = q.next_event(T).unwrap().unwrap();
    assert_eq!(e.name, "SHUTDOWN");
    assert_eq!(e.data["reason"], "guest-shutdown");
    h.join().unwrap();
    // Queue empty and peer gone -> closed.
    assert!(matches!(
        q.next_event(Duration::from_millis(200)),
        Err(QmpError::Closed)
    ));
}

#[test]
fn next_event_waits_and_returns_none_on_timeout() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (c, h) = fake(move |mut s| {
        s.greet();
        go_rx.recv().unwrap();
        thread::sleep(Duration::from_millis(50));
        s.event("RTC_CHANGE", 9, json!({"offset": 1}));
        go_rx.recv().ok(); // keep the connection open until the client is done
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    assert_eq!(q.next_event(Duration::from_millis(50)).unwrap(), None);
    go_tx.send(()).unwrap();
    let e = q.next_event(T).unwrap().unwrap();
    assert_eq!(e.name, "RTC_CHANGE");
    assert_eq!(e.data["offset"], 1);
    drop(go_tx);
    h.join().unwrap();
}

#[test]
fn wait_for_event_keeps_other_events_queued() {
    let (c, h) = fake(|mut s| {
        s.greet();
        s.event("A", 1, json!({}));
        s.event("B", 2, json!({}));
        s.event("C", 3, json!({}));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let e = q.wait_for_event("C", T).unwrap().unwrap();
    assert_eq!(e.timestamp, (3, 42));
    let names: Vec<_> = q.take_events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["A", "B"]);
    h.join().unwrap();
}

#[test]
fn error_reply_is_command_error() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let req = s.recv();
        assert_eq!(req["execute"], "set_link");
        assert_eq!(req["arguments"], json!({"name": "nic9", "up": false}));
        s.send(json!({
            "error": {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"},
            "id": req["id"],
        }));
        // Connection stays usable after a command error.
        let req = s.recv();
        s.send(json!({"return": {"status": "paused", "running": false}, "id": req["id"]}));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let err = q.set_link("nic9", false).unwrap_err();
    match &err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "set_link");
            assert_eq!(class, "DeviceNotFound");
            assert_eq!(desc, "Device 'nic9' not found");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("failed: DeviceNotFound"), "{err}");
    assert_eq!(q.query_status().unwrap(), "paused");
    h.join().unwrap();
}

#[test]
fn partial_writes_byte_by_byte() {
    let (c, h) = fake(|mut s| {
        s.byte_by_byte = true;
        s.greet();
        let req = s.recv();
        s.event("STOP", 7, json!({}));
        s.send(json!({"return": "7.2.1\r\n", "id": req["id"]}));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    assert_eq!(
        q.human_monitor_command("info version").unwrap(),
        "7.2.1\r\n"
    );
    assert_eq!(q.next_event(T).unwrap().unwrap().name, "STOP");
    h.join().unwrap();
}

#[test]
fn several_messages_in_one_write() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let req = s.recv();
        let id = &req["id"];
        s.send_raw(&format!(
            "{{\"event\":\"STOP\",\"timestamp\":{{\"seconds\":1,\"microseconds\":2}}}}\r\n\r\n{{\"return\":{{}},\"id\":{id}}}\r\n"
        ));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    q.stop().unwrap();
    assert_eq!(q.next_event(T).unwrap().unwrap().timestamp, (1, 2));
    h.join().unwrap();
}

#[test]
fn many_short_lines_in_one_read_are_linear() {
    // Found by the `qmp_reply` fuzz target: each line was cut off the front of the buffer
    // separately (moving the rest of the read each time: quadratic in the read size) and
    // every line returned zeroed a 64 KiB read buffer, so 8 MiB of blank lines took ~17 s
    // here (1.5 s per MiB in a release build). Now it is one pass.
    let (c, h) = fake(|mut s| {
        s.writer.write_all(&vec![b'\n'; 8 << 20]).unwrap();
        s.greet();
        let req = s.recv();
        let mut burst = String::new();
        for i in 0..20_000 {
            burst.push_str(&format!("{{\"event\":\"E{i}\"}}\n\n"));
        }
        s.send_raw(&burst);
        s.send(json!({"return": {}, "id": req["id"]}));
    });
    let start = Instant::now();
    let mut q = Qmp::handshake(c, Duration::from_secs(60)).unwrap();
    q.stop().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(q.queued_events(), 20_000);
    assert_eq!(q.take_events()[19_999].name, "E19999");
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    h.join().unwrap();
}

#[test]
fn silent_server_times_out_and_stale_reply_is_dropped() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (c, h) = fake(move |mut s| {
        s.greet();
        let first = s.recv(); // never answered in time
        go_rx.recv().unwrap();
        // Late reply to the first command, then the real reply to the second.
        s.send(json!({"return": {"status": "stale"}, "id": first["id"]}));
        let second = s.recv();
        s.send(json!({"return": {"status": "running"}, "id": second["id"]}));
        go_rx.recv().ok();
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let start = Instant::now();
    let err = q
        .execute("query-status", None, Duration::from_millis(200))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    go_tx.send(()).unwrap();
    assert_eq!(q.query_status().unwrap(), "running");
    drop(go_tx);
    h.join().unwrap();
}

#[test]
fn handshake_times_out_without_greeting() {
    let (c, _server) = UnixStream::pair().unwrap();
    let err = Qmp::handshake(c, Duration::from_millis(100)).unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[test]
fn closed_peer_is_closed() {
    // During handshake.
    let (c, server) = UnixStream::pair().unwrap();
    drop(server);
    assert!(matches!(Qmp::handshake(c, T), Err(QmpError::Closed)));

    // While waiting for a reply (a partial line is pending when the peer goes).
    let (c, h) = fake(|mut s| {
        s.greet();
        let _ = s.recv();
        s.send_raw("{\"return\": {");
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let err = q.execute("query-status", None, T).unwrap_err();
    assert!(matches!(err, QmpError::Closed), "{err}");
    assert!(err.to_string().contains("closed"));
    // Sticky.
    assert!(matches!(q.next_event(T), Err(QmpError::Closed)));
    h.join().unwrap();
}

#[test]
fn garbage_line_is_protocol_error_with_excerpt() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let _ = s.recv();
        s.send_raw("this is not json at all\r\n");
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let err = q.execute("query-status", None, T).unwrap_err();
    match &err {
        QmpError::Protocol { excerpt, .. } => assert_eq!(excerpt, "this is not json at all"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("this is not json"), "{err}");
    h.join().unwrap();
}

#[test]
fn oversized_line_is_error_not_oom() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let _ = s.recv();
        let big = vec![b'x'; MAX_LINE_LEN + 1024 * 1024];
        // The client stops reading once over the limit and drops the socket,
        // so this write may fail with EPIPE; that is fine.
        let _ = s.writer.write_all(&big);
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let err = q.execute("query-status", None, T).unwrap_err();
    assert!(matches!(err, QmpError::LineTooLong { .. }), "{err}");
    assert!(err.to_string().contains("longer than"), "{err}");
    drop(q);
    h.join().unwrap();
}

#[test]
fn oversized_line_then_resync() {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (c, h) = fake(move |mut s| {
        s.greet();
        let req = s.recv();
        let mut big = vec![b'x'; MAX_LINE_LEN + 70 * 1024];
        big.extend_from_slice(b"\r\n");
        s.writer.write_all(&big).unwrap();
        // Reply to the failed command (stale by now), then an event.
        s.send(json!({"return": {"status": "running"}, "id": req["id"]}));
        s.event("AFTER", 1, json!({}));
        done_rx.recv().ok();
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    let err = q.execute("query-status", None, T).unwrap_err();
    assert!(matches!(err, QmpError::LineTooLong { .. }), "{err}");
    // The client skips the rest of the oversized line and the stale reply.
    assert_eq!(q.next_event(T).unwrap().unwrap().name, "AFTER");
    drop(done_tx);
    h.join().unwrap();
}

#[test]
fn convenience_commands_send_expected_json() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let expect = |s: &mut Server, cmd: &str, args: Option<Value>, ret: Value| {
            let req = s.recv();
            assert_eq!(req["execute"], cmd);
            assert_eq!(req.get("arguments").cloned(), args, "{cmd}");
            assert!(req["id"].is_u64());
            s.send(json!({"return": ret, "id": req["id"]}));
        };
        expect(
            &mut s,
            "send-key",
            Some(json!({"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "number", "data": 0x3b},
            ], "hold-time": 50})),
            json!({}),
        );
        expect(
            &mut s,
            "send-key",
            Some(json!({"keys": [{"type": "qcode", "data": "ret"}]})),
            json!({}),
        );
        expect(
            &mut s,
            "screendump",
            Some(json!({"filename": "/tmp/shot.png", "format": "png"})),
            json!({}),
        );
        expect(
            &mut s,
            "screendump",
            Some(json!({"filename": "/tmp/shot.ppm", "format": "ppm"})),
            json!({}),
        );
        expect(
            &mut s,
            "set_link",
            Some(json!({"name": "nic0", "up": true})),
            json!({}),
        );
        expect(
            &mut s,
            "human-monitor-command",
            Some(json!({"command-line": "info status"})),
            json!("VM status: running\r\n"),
        );
        expect(&mut s, "stop", None, json!({}));
        expect(&mut s, "cont", None, json!({}));
        expect(&mut s, "quit", None, json!({}));
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    q.send_key(&["ctrl", "alt", "0x3b"], Some(50)).unwrap();
    q.send_key(&["ret"], None).unwrap();
    q.screendump(&PathBuf::from("/tmp/shot.png"), true).unwrap();
    q.screendump(&PathBuf::from("/tmp/shot.ppm"), false)
        .unwrap();
    q.set_link("nic0", true).unwrap();
    assert_eq!(
        q.human_monitor_command("info status").unwrap(),
        "VM status: running\r\n"
    );
    q.stop().unwrap();
    q.cont().unwrap();
    q.quit().unwrap();
    assert!(matches!(
        q.send_key(&[], None),
        Err(QmpError::InvalidArgument(_))
    ));
    h.join().unwrap();
}

#[test]
fn quit_tolerates_peer_closing_before_reply() {
    let (c, h) = fake(|mut s| {
        s.greet();
        let req = s.recv();
        assert_eq!(req["execute"], "quit");
        // drop without replying, like a QEMU exiting fast
    });
    let mut q = Qmp::handshake(c, T).unwrap();
    q.quit().unwrap();
    h.join().unwrap();
}

// ---------------------------------------------------------------- real QEMU

/// Kills and reaps QEMU, and removes the temp dir, however the test exits.
struct QemuGuard {
    child: Child,
    dir: PathBuf,
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn real_qemu_status_version_and_quit() {
    let qemu = "qemu-system-x86_64";
    if !vmrig_testkit::require_program(qemu) {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    // Keep the socket path short (sun_path is 108 bytes): use /tmp directly.
    let dir = PathBuf::from(format!("/tmp/vmrig-qmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("q.sock");
    let child = Command::new(qemu)
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu");
    let mut guard = QemuGuard { child, dir };

    let mut q = Qmp::connect(&sock, Duration::from_secs(20)).expect("qmp connect");
    let (major, _, _) = q.qemu_version().expect("version in greeting");
    assert!(major >= 7);
    assert_eq!(q.query_status().unwrap(), "prelaunch");
    let version = q.human_monitor_command("info version").unwrap();
    assert!(version.contains("7."), "info version: {version:?}");
    q.quit().unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = guard.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "qemu did not exit after quit");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "qemu exit status {status}");
}
