//! `report.html` in a real browser: a failing two-machine run on fake machines (see
//! support/), its page rendered by headless Chromium, the DOM checked (`--dump-dom`) and a
//! screenshot taken and looked at.

mod support;

use std::path::Path;
use std::process::Command;

use support::Rig;

/// Headless Chromium (`chromium` from Debian) on `page` with `args`; its stdout.
fn chromium(page: &Path, args: &[&str]) -> Option<String> {
    let program = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())?;
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(program)
        // No sandbox: it cannot start as root, which CI is; the page is our own.
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_report_of_a_failing_run_renders_in_chromium() {
    let rig = Rig::new("[nodes.server]\ngraphics = true\n[nodes.client]\n");
    let out = rig.run(
        "start_all()\n\
         server.screenshot('desk')\n\
         with subtest('the client reaches the server'):\n    \
             client.succeed('echo reaching; false')\n",
    );
    out.failed_with(&["false"]);
    let page = out.out_dir.join("report.html");
    let Some(dom) = chromium(&page, &["--dump-dom"]) else {
        vmrig_testkit::cannot_run("no chromium (Debian package `chromium`)");
        return;
    };
    let has = |needle: &str| assert!(dom.contains(needle), "{needle:?} not in the DOM:\n{dom}");
    has("<span class=\"badge\" id=\"outcome\">FAILED</span>");
    has("id=\"failure\"");
    // The failing subtest and the failing command are open and marked, with the output.
    has("<details class=\"subtest step-failed\" open=\"\">");
    has("subtest: the client reaches the server");
    has("<details class=\"step step-failed\" open=\"\">");
    has("reaching");
    // A lane per machine, the screenshot inline, the serial logs.
    has("data-machine=\"server\"");
    has("data-machine=\"client\"");
    has("alt=\"desk.png\" src=\"data:image/png;base64,");
    has("serial-client.log");
    has("<a href=\"events.jsonl\">events.jsonl</a>");

    let shot = out.out_dir.join("report-shot.png");
    chromium(
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,700",
        ],
    );
    let image = image::open(&shot).expect("chromium's screenshot").to_rgb8();
    assert_eq!(image.dimensions(), (1000, 700));
    // The page was drawn with its style: the red of the FAILED badge and failure box is there.
    let red = image
        .pixels()
        .filter(|p| p[0] > 150 && p[1] < 80 && p[2] < 80)
        .count();
    assert!(
        red > 200,
        "only {red} red pixels: the page's style did not apply"
    );
}
