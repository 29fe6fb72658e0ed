//! The page itself: HTML from a run's [`Run`] and its output directory's files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::{collect, Block, Item, Run, REPORT_FILE, SERIAL_LOG_LIMIT};
use crate::events::{Level, Stamped};

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
pub(super) fn render(events: &[Stamped], out_dir: &Path) -> String {
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
