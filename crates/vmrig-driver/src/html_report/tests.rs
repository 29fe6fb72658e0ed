//! The page, from events made up here and files in a temporary output directory.

use std::time::Duration;

use super::page::render;
use super::*;

fn at(ms: u64, event: Event) -> Stamped {
    Stamped {
        time: SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_800_000_000)
            + Duration::from_millis(ms),
        event,
    }
}

fn begin(id: u64, message: &str, machine: Option<&str>) -> Event {
    Event::BlockBegin {
        id,
        depth: 0,
        kind: BlockKind::Nested,
        message: message.into(),
        machine: machine.map(Into::into),
    }
}

fn end(id: u64, message: &str, error: Option<&str>) -> Event {
    Event::BlockEnd {
        id,
        depth: 0,
        kind: BlockKind::Nested,
        message: message.into(),
        elapsed: Duration::ZERO,
        error: error.map(Into::into),
    }
}

fn failing_run() -> Vec<Stamped> {
    vec![
        at(
            0,
            Event::RunStarted {
                test: "t<1>".into(),
                file: "t.toml".into(),
            },
        ),
        at(10, begin(1, "run the VM test script", None)),
        at(20, begin(2, "must succeed: curl server", Some("client"))),
        at(
            30,
            begin(3, "waiting for the VM to finish booting", Some("client")),
        ),
        at(1030, end(3, "waiting for the VM to finish booting", None)),
        at(
            1100,
            Event::Log {
                level: Level::Warning,
                message: "slow <disk>".into(),
                machine: Some("client".into()),
                depth: 2,
            },
        ),
        at(
            2000,
            end(
                2,
                "must succeed: curl server",
                Some("command `curl server` failed (exit code 7)\ncurl: (7) refused"),
            ),
        ),
        at(
            2010,
            end(
                1,
                "run the VM test script",
                Some("RequestedAssertionFailed"),
            ),
        ),
        at(
            2020,
            Event::ScriptFailed {
                exc_type: "RequestedAssertionFailed".into(),
                message: "command `curl server` failed".into(),
                line: Some(4),
                file: "t.toml".into(),
                traceback: "Traceback:\n  line 4\n".into(),
            },
        ),
        at(
            2030,
            Event::RunFinished {
                passed: false,
                elapsed: Duration::from_secs(2),
                summary: "test t FAILED".into(),
            },
        ),
    ]
}

#[test]
fn a_failing_run_opens_and_marks_the_failing_steps() {
    let dir = tempfile::tempdir().unwrap();
    let page = render(&failing_run(), dir.path());
    assert!(page.contains("<body class=\"failed\">"));
    assert!(page.contains(
        "<b>RequestedAssertionFailed: command `curl server` failed</b> at <code>t.toml:4</code>"
    ));
    // The failing step and its parent are open and marked; the boot inside is closed.
    assert!(page.contains("<details class=\"step step-failed\" open><summary><span class=\"t\">0.02s</span> <span class=\"who\">client:</span> must succeed: curl server"));
    assert!(page.contains("<details class=\"step\"><summary><span class=\"t\">0.03s</span> <span class=\"who\">client:</span> waiting for the VM"));
    assert!(page.contains(
        "<pre class=\"error\">command `curl server` failed (exit code 7)\ncurl: (7) refused</pre>"
    ));
    // Text is escaped everywhere.
    assert!(page.contains("<title>t&lt;1&gt; - vmrig</title>"));
    assert!(page.contains("slow &lt;disk&gt;"));
    assert!(!page.contains("<disk>"));
}

#[test]
fn the_timeline_has_a_lane_per_machine_with_its_steps_and_boots() {
    let dir = tempfile::tempdir().unwrap();
    let page = render(&failing_run(), dir.path());
    let lane = page.split("data-machine=\"client\"").nth(1).unwrap();
    let lane = lane.split("</div>\n").next().unwrap();
    // The outer step failed (red), the boot inside it is grey; times are on one axis.
    assert!(
        lane.contains("class=\"bar bad\" style=\"left:0.985%;width:97.537%\""),
        "{lane}"
    );
    assert!(
        lane.contains("class=\"bar boot\" style=\"left:1.478%;width:49.261%\""),
        "{lane}"
    );
}

#[test]
fn files_of_the_output_directory_are_inlined_or_linked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("serial-client.log"),
        "Linux version <6>\nlogin:\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("shot.png"), b"\x89PNG").unwrap();
    std::fs::write(dir.path().join("vlan1.pcap"), b"").unwrap();
    let mut events = failing_run();
    events.insert(
        5,
        at(
            1050,
            Event::Log {
                level: Level::Info,
                message: format!(
                    "screenshot saved to {}",
                    dir.path().join("shot.png").display()
                ),
                machine: Some("client".into()),
                depth: 2,
            },
        ),
    );
    let page = render(&events, dir.path());
    assert!(page.contains(
        "serial-client.log (2 lines)</summary><pre>Linux version &lt;6&gt;\nlogin:\n</pre>"
    ));
    // Once in the log where it was taken, once in the gallery.
    assert_eq!(
        page.matches("src=\"data:image/png;base64,iVBORw==\"")
            .count(),
        2
    );
    assert!(page.contains("<a href=\"vlan1.pcap\">vlan1.pcap</a>"));
}

#[test]
fn a_file_written_after_the_run_is_linked_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(REPORT_FILE),
        render(&failing_run(), dir.path()),
    )
    .unwrap();
    add_link(dir.path(), &dir.path().join("junit.xml")).unwrap();
    add_link(dir.path(), &dir.path().join("junit.xml")).unwrap();
    add_link(dir.path(), Path::new("/elsewhere/all.xml")).unwrap();
    let page = std::fs::read_to_string(dir.path().join(REPORT_FILE)).unwrap();
    assert_eq!(
        page.matches("<a href=\"junit.xml\">junit.xml</a>").count(),
        1
    );
    assert!(page.contains("<a href=\"/elsewhere/all.xml\">all.xml</a>"));
}

#[test]
fn the_page_is_written_when_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let report = HtmlReport::new(dir.path());
    for event in failing_run() {
        let last = matches!(event.event, Event::RunFinished { .. });
        assert!(!dir.path().join(REPORT_FILE).exists(), "written early");
        report.report(&event);
        if last {
            assert!(dir.path().join(REPORT_FILE).exists());
        }
    }
}

#[test]
fn a_run_without_an_end_leaves_its_page_when_its_log_goes() {
    let dir = tempfile::tempdir().unwrap();
    let report = HtmlReport::new(dir.path());
    for event in failing_run().into_iter().take(4) {
        report.report(&event);
    }
    drop(report);
    let page = std::fs::read_to_string(dir.path().join(REPORT_FILE)).unwrap();
    assert!(
        page.contains("<body class=\"failed\">"),
        "an unfinished run did not pass"
    );
}
