//! `report.html`: one self-contained page per run, written into the output directory when
//! the run finishes, that opens from a CI artifact without a server. It holds the nested
//! log (collapsible, the failing steps open and marked), a timeline per machine, the
//! screenshots (inline), each machine's serial log and links to the other files of the
//! output directory (pcaps, `events.jsonl`, JUnit).
//!
//! The page is built from the run's events (an [`HtmlReport`] is one of the run's
//! reporters) and the files the run left in its output directory. It needs no script: the
//! nesting is `<details>`, the timeline plain positioned boxes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;

use crate::events::{BlockKind, Event, Level, Reporter, Stamped};

/// The file name in the output directory.
pub const REPORT_FILE: &str = "report.html";

/// Serial logs longer than this are cut to their end (the page must stay openable).
const SERIAL_LOG_LIMIT: usize = 2 << 20;

/// Collects a run's events; writes the page at `RunFinished`, or when it is dropped
/// without one (a run that ended some other way still leaves its page).
pub struct HtmlReport {
    out_dir: PathBuf,
    events: Mutex<Vec<Stamped>>,
    written: std::sync::atomic::AtomicBool,
}

impl HtmlReport {
    pub fn new(out_dir: &Path) -> HtmlReport {
        HtmlReport {
            out_dir: out_dir.to_owned(),
            events: Mutex::new(Vec::new()),
            written: Default::default(),
        }
    }

    fn write(&self, events: &[Stamped]) {
        self.written
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A report is a convenience: failing to write it never fails the run.
        let _ = std::fs::write(
            self.out_dir.join(REPORT_FILE),
            render(events, &self.out_dir),
        );
    }
}

impl Drop for HtmlReport {
    fn drop(&mut self) {
        let events = std::mem::take(self.events.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !self.written.load(std::sync::atomic::Ordering::SeqCst) && !events.is_empty() {
            self.write(&events);
        }
    }
}

impl Reporter for HtmlReport {
    fn report(&self, event: &Stamped) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // Console lines are in the serial logs: keep only who printed, not what.
        match &event.event {
            Event::Console { machine, .. } => events.push(Stamped {
                time: event.time,
                event: Event::Console {
                    machine: machine.clone(),
                    line: String::new(),
                },
            }),
            _ => events.push(event.clone()),
        }
        if matches!(event.event, Event::RunFinished { .. }) {
            self.write(&events);
        }
    }
}

/// A block of the nested log, with what happened inside it.
#[derive(Debug, Default)]
struct Block {
    message: String,
    machine: Option<String>,
    subtest: bool,
    start: f64,
    end: Option<f64>,
    error: Option<String>,
    children: Vec<Item>,
}

#[derive(Debug)]
enum Item {
    Block(Block),
    Log {
        time: f64,
        level: Level,
        machine: Option<String>,
        message: String,
    },
}

/// What the page shows, gathered from the events.
#[derive(Debug, Default)]
struct Run {
    test: String,
    file: String,
    start: f64,
    end: f64,
    passed: Option<bool>,
    summary: String,
    failure: Option<(String, String, String)>,
    top: Vec<Item>,
    machines: Vec<String>,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn collect(events: &[Stamped]) -> Run {
    let mut run = Run::default();
    let mut open: Vec<Block> = Vec::new();
    let seen = |run: &mut Run, m: &Option<String>| {
        if let Some(m) = m {
            if !run.machines.contains(m) {
                run.machines.push(m.clone());
            }
        }
    };
    for stamped in events {
        let time = secs(stamped.time);
        if run.start == 0.0 {
            run.start = time;
        }
        run.end = run.end.max(time);
        match &stamped.event {
            Event::RunStarted { test, file } => {
                run.test = test.clone();
                run.file = file.clone();
            }
            Event::BlockBegin {
                kind,
                message,
                machine,
                ..
            } => {
                seen(&mut run, machine);
                open.push(Block {
                    message: message.clone(),
                    machine: machine.clone(),
                    subtest: *kind == BlockKind::Subtest,
                    start: time,
                    ..Block::default()
                });
            }
            Event::BlockEnd { error, .. } => {
                if let Some(mut block) = open.pop() {
                    block.end = Some(time);
                    block.error = error.clone();
                    push(&mut open, &mut run.top, Item::Block(block));
                }
            }
            Event::Log {
                level,
                message,
                machine,
                ..
            } => {
                seen(&mut run, machine);
                let item = Item::Log {
                    time,
                    level: *level,
                    machine: machine.clone(),
                    message: message.clone(),
                };
                push(&mut open, &mut run.top, item);
            }
            Event::Info { message } => {
                let item = Item::Log {
                    time,
                    level: Level::Info,
                    machine: None,
                    message: message.clone(),
                };
                push(&mut open, &mut run.top, item);
            }
            Event::Console { machine, .. } => seen(&mut run, &Some(machine.clone())),
            Event::ScriptFailed {
                exc_type,
                message,
                line,
                file,
                traceback,
            } => {
                let place = match line {
                    Some(line) => format!("{file}:{line}"),
                    None => file.clone(),
                };
                run.failure = Some((place, format!("{exc_type}: {message}"), traceback.clone()));
            }
            Event::RunFinished {
                passed, summary, ..
            } => {
                run.passed = Some(*passed);
                run.summary = summary.clone();
            }
        }
    }
    // Blocks still open when the run ended (a killed run) end with it.
    while let Some(mut block) = open.pop() {
        block.end = Some(run.end);
        push(&mut open, &mut run.top, Item::Block(block));
    }
    run
}

fn push(open: &mut [Block], top: &mut Vec<Item>, item: Item) {
    match open.last_mut() {
        Some(parent) => parent.children.push(item),
        None => top.push(item),
    }
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&#39;"),
            c => s.push(c),
        }
    }
    s
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.4em 0 .4em}
.badge{padding:.1em .5em;border-radius:.3em;color:#fff;font-weight:bold}
.passed .badge{background:#2a7d2a} .failed .badge{background:#b52a2a}
.failure{border:2px solid #b52a2a;background:#fdf0f0;padding:.6em 1em;border-radius:.3em}
pre{background:#f5f5f5;padding:.5em;overflow-x:auto;white-space:pre-wrap;margin:.3em 0}
details{margin-left:1.2em} summary{cursor:pointer}
details.step-failed>summary{color:#b52a2a;font-weight:bold}
.log{margin-left:1.2em;white-space:pre-wrap} .warning{color:#a06000} .error{color:#b52a2a}
.who{color:#555} .t{color:#888;font-size:.85em}
.timeline{position:relative;border-left:1px solid #ccc}
.lane{position:relative;height:22px;border-bottom:1px solid #eee}
.lane-name{position:absolute;left:-9em;width:8.5em;text-align:right;font-size:.85em}
.bar{position:absolute;top:3px;height:16px;background:#4a7fc1;min-width:2px;opacity:.85}
.bar.boot{background:#999} .bar.bad{background:#b52a2a}
.axis{position:relative;height:1.2em;font-size:.8em;color:#888}
.axis span{position:absolute;white-space:nowrap} .axis span:last-child{transform:translateX(-100%)}
img.shot{max-width:480px;border:1px solid #ccc;display:block;margin:.3em 0}
";

/// The whole page.
fn render(events: &[Stamped], out_dir: &Path) -> String {
    let run = collect(events);
    let state = match run.passed {
        Some(true) => "passed",
        _ => "failed",
    };
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{} - vmrig</title><style>{STYLE}</style></head>\n<body class=\"{state}\">\n\
         <h1 id=\"title\">{} <span class=\"badge\" id=\"outcome\">{}</span></h1>\n\
         <div id=\"summary\">{} <span class=\"t\">({})</span></div>\n",
        esc(&run.test),
        esc(&run.test),
        state.to_uppercase(),
        esc(&run.summary),
        esc(&run.file),
    );
    if let Some((place, what, traceback)) = &run.failure {
        // The exception's first line stands out; the rest (output, console lines) follows.
        let (first, rest) = what.split_once('\n').unwrap_or((what, ""));
        let _ = write!(
            h,
            "<div class=\"failure\" id=\"failure\"><b>{}</b> at <code>{}</code>",
            esc(first),
            esc(place)
        );
        for text in [rest, traceback] {
            if !text.trim().is_empty() {
                let _ = write!(h, "<pre>{}</pre>", esc(text.trim_end()));
            }
        }
        h.push_str("</div>\n");
    }
    timeline(&mut h, &run);
    h.push_str("<h2>Log</h2>\n<div id=\"log\">\n");
    for item in &run.top {
        item_html(&mut h, item, &run, out_dir);
    }
    h.push_str("</div>\n");
    screenshots(&mut h, out_dir);
    serial_logs(&mut h, out_dir);
    files(&mut h, out_dir);
    h.push_str("</body></html>\n");
    h
}

fn item_html(h: &mut String, item: &Item, run: &Run, out_dir: &Path) {
    match item {
        Item::Log {
            time,
            level,
            machine,
            message,
        } => {
            let class = match level {
                Level::Warning => "log warning",
                Level::Error => "log error",
                _ => "log",
            };
            let _ = writeln!(
                h,
                "<div class=\"{class}\"><span class=\"t\">{:.2}s</span> {}{}</div>",
                time - run.start,
                who(machine),
                esc(message)
            );
            if let Some(shot) = screenshot_in(message, out_dir) {
                let _ = writeln!(h, "{}", img(&shot));
            }
        }
        Item::Block(b) => {
            let failed = b.error.is_some();
            // Open: the failing steps, and the script's own top block.
            let open = failed || b.machine.is_none() && b.message == "run the VM test script";
            let elapsed = b.end.unwrap_or(run.end) - b.start;
            let _ = writeln!(
                h,
                "<details class=\"{}{}\"{}><summary><span class=\"t\">{:.2}s</span> {}{}{} \
                 <span class=\"t\">({:.2} s)</span></summary>",
                if b.subtest { "subtest" } else { "step" },
                if failed { " step-failed" } else { "" },
                if open { " open" } else { "" },
                b.start - run.start,
                who(&b.machine),
                if b.subtest { "subtest: " } else { "" },
                esc(&b.message),
                elapsed
            );
            if let Some(error) = &b.error {
                let _ = writeln!(h, "<pre class=\"error\">{}</pre>", esc(error));
            }
            for child in &b.children {
                item_html(h, child, run, out_dir);
            }
            h.push_str("</details>\n");
        }
    }
}

fn who(machine: &Option<String>) -> String {
    machine
        .as_ref()
        .map(|m| format!("<span class=\"who\">{}:</span> ", esc(m)))
        .unwrap_or_default()
}

/// One lane per machine: its boots and restores (grey) and its outermost steps (blue, red
/// when they failed), on the run's time axis.
fn timeline(h: &mut String, run: &Run) {
    if run.machines.is_empty() {
        return;
    }
    let span = (run.end - run.start).max(0.001);
    let pct = |t: f64| ((t - run.start) / span * 100.0).clamp(0.0, 100.0);
    h.push_str(
        "<h2>Timeline</h2>\n<div style=\"margin-left:9em\"><div class=\"timeline\" id=\"timeline\">\n",
    );
    for machine in &run.machines {
        let mut bars = Vec::new();
        for item in &run.top {
            machine_bars(item, machine, false, &mut bars);
        }
        let _ = write!(
            h,
            "<div class=\"lane\" data-machine=\"{m}\"><span class=\"lane-name\">{m}</span>",
            m = esc(machine)
        );
        for (b, boot) in bars {
            let end = b.end.unwrap_or(run.end);
            let class = if b.error.is_some() {
                "bar bad"
            } else if boot {
                "bar boot"
            } else {
                "bar"
            };
            let _ = write!(
                h,
                "<div class=\"{class}\" style=\"left:{:.3}%;width:{:.3}%\" title=\"{} ({:.2} s)\"></div>",
                pct(b.start),
                pct(end) - pct(b.start),
                esc(&b.message),
                end - b.start
            );
        }
        h.push_str("</div>\n");
    }
    h.push_str("</div><div class=\"axis\">");
    for i in 0..=4 {
        let _ = write!(
            h,
            "<span style=\"left:{}%\">{:.1} s</span>",
            i * 25,
            span * f64::from(i) / 4.0
        );
    }
    h.push_str("</div></div>\n");
}

/// The bars of `machine`: its outermost steps, and inside them its boots and restores.
fn machine_bars<'a>(item: &'a Item, machine: &str, inside: bool, out: &mut Vec<(&'a Block, bool)>) {
    let Item::Block(b) = item else { return };
    let mine = b.machine.as_deref() == Some(machine);
    let boot = mine && is_boot(&b.message);
    if mine && (!inside || boot) {
        out.push((b, boot));
    }
    for child in &b.children {
        machine_bars(child, machine, inside || mine, out);
    }
}

fn is_boot(message: &str) -> bool {
    ["starting vm", "finish booting", "restor", "boot snapshot"]
        .iter()
        .any(|k| message.contains(k))
}

/// Files of the output directory with `suffix`, sorted by name.
fn files_ending(out_dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// The screenshot a log line names (`screenshot saved to <file>`), when it is there.
fn screenshot_in(message: &str, out_dir: &Path) -> Option<PathBuf> {
    let file = message.strip_prefix("screenshot saved to ")?;
    let path = PathBuf::from(file);
    let path = if path.is_absolute() {
        path
    } else {
        out_dir.join(path)
    };
    path.is_file().then_some(path)
}

fn img(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    format!(
        "<img class=\"shot\" alt=\"{}\" src=\"data:image/png;base64,{}\">",
        esc(&file_name(path)),
        base64::engine::general_purpose::STANDARD.encode(data)
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn screenshots(h: &mut String, out_dir: &Path) {
    let shots = files_ending(out_dir, ".png");
    if shots.is_empty() {
        return;
    }
    h.push_str("<h2>Screenshots</h2>\n<div id=\"screenshots\">\n");
    for shot in shots {
        let _ = writeln!(
            h,
            "<figure>{}<figcaption>{}</figcaption></figure>",
            img(&shot),
            esc(&file_name(&shot))
        );
    }
    h.push_str("</div>\n");
}

fn serial_logs(h: &mut String, out_dir: &Path) {
    let logs: Vec<PathBuf> = files_ending(out_dir, ".log")
        .into_iter()
        .filter(|p| file_name(p).starts_with("serial-"))
        .collect();
    if logs.is_empty() {
        return;
    }
    h.push_str("<h2>Serial logs</h2>\n<div id=\"serial-logs\">\n");
    for log in logs {
        let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        let (cut, text) = if text.len() > SERIAL_LOG_LIMIT {
            let mut from = text.len() - SERIAL_LOG_LIMIT;
            while !text.is_char_boundary(from) {
                from += 1;
            }
            (true, &text[from..])
        } else {
            (false, &text[..])
        };
        let name = file_name(&log);
        let _ = writeln!(
            h,
            "<details class=\"serial\"><summary>{} ({} lines{})</summary><pre>{}</pre></details>",
            esc(&name),
            text.lines().count(),
            if cut { ", the end only" } else { "" },
            esc(text)
        );
    }
    h.push_str("</div>\n");
}

/// Where [`add_link`] adds links to files written after the page.
const MORE_LINKS: &str = "<!-- more links -->";

/// Links to the output directory's other files (relative: the page moves with them).
fn files(h: &mut String, out_dir: &Path) {
    let mut links = Vec::new();
    for suffix in [".pcap", ".jsonl", ".xml"] {
        links.extend(files_ending(out_dir, suffix));
    }
    h.push_str("<h2>Files</h2>\n<ul id=\"files\">\n");
    for link in links {
        h.push_str(&link_item(out_dir, &link));
    }
    h.push_str(MORE_LINKS);
    h.push_str("\n</ul>\n");
}

fn link_item(out_dir: &Path, file: &Path) -> String {
    let href = file
        .strip_prefix(out_dir)
        .unwrap_or(file)
        .display()
        .to_string();
    format!(
        "<li><a href=\"{}\">{}</a></li>\n",
        esc(&href),
        esc(&file_name(file))
    )
}

/// Adds a link to `file` to the page in `out_dir`, for files written after the run ended
/// (the JUnit report of a whole invocation). Relative when `file` is in `out_dir`.
pub fn add_link(out_dir: &Path, file: &Path) -> std::io::Result<()> {
    let page_path = out_dir.join(REPORT_FILE);
    let page = std::fs::read_to_string(&page_path)?;
    let item = link_item(out_dir, file);
    if page.contains(&item) {
        return Ok(());
    }
    let page = page.replacen(MORE_LINKS, &format!("{item}{MORE_LINKS}"), 1);
    std::fs::write(page_path, page)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        assert!(page.contains("<b>RequestedAssertionFailed: command `curl server` failed</b> at <code>t.toml:4</code>"));
        // The failing step and its parent are open and marked; the boot inside is closed.
        assert!(page.contains("<details class=\"step step-failed\" open><summary><span class=\"t\">0.02s</span> <span class=\"who\">client:</span> must succeed: curl server"));
        assert!(page.contains("<details class=\"step\"><summary><span class=\"t\">0.03s</span> <span class=\"who\">client:</span> waiting for the VM"));
        assert!(page.contains("<pre class=\"error\">command `curl server` failed (exit code 7)\ncurl: (7) refused</pre>"));
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
}
