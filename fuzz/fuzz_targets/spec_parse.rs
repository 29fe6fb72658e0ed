//! `vmrig_spec::parse` on arbitrary text: a `TestSpec` or a `SpecError`, never a panic; an
//! error is one line, points inside the text, and renders with miette.
//!
//! The test file is placed in a directory that does not exist, so relative
//! `test_script_file` and `source` paths fail to resolve.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/vmrig-fuzz/test.toml");
    match vmrig_spec::parse(text, path) {
        Ok(spec) => {
            // The image hash of every node is computable (canonical JSON of its inputs).
            for node in spec.nodes.values() {
                assert_eq!(node.image_inputs().hash().len(), 32);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line message: {msg:?}");
            if let Some(line) = e.line() {
                assert!(line >= 1 && line <= text.lines().count() + 1, "{msg}");
                assert!(e.column().is_some_and(|c| c >= 1), "{msg}");
            }
            if let Some(span) = e.span() {
                assert!(
                    span.start <= span.end && span.end <= text.len(),
                    "{msg}: {span:?}"
                );
            }
            let mut out = String::new();
            // Without wrapping the message (textwrap's word breaking was a quarter of the
            // time per input; the spans and source snippets are rendered all the same).
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .with_wrap_lines(false)
                .render_report(&mut out, &e)
                .expect("rendering an error");
        }
    }
});
