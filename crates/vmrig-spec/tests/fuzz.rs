//! Garbage in never panics, and every error is one well-placed line.

use std::path::Path;

use proptest::prelude::*;
use vmrig_spec::parse;

const VALID: &str = include_str!("fixtures/full.toml");

fn fixture_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz.toml")
}

/// Parse; on error, check that the message is one line and the place is inside the text.
fn no_panic(text: &str) {
    if let Err(e) = parse(text, &fixture_path()) {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "multi-line message: {msg:?}");
        if let Some(line) = e.line() {
            assert!(line >= 1 && line <= text.lines().count() + 1, "{msg}");
            assert!(e.column().unwrap() >= 1);
            let span = e.span().unwrap();
            assert!(span.start <= text.len(), "{msg}");
        }
        // Rendering with miette must not panic either.
        let mut out = String::new();
        let _ =
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
                .render_report(&mut out, &e);
    }
}

fn char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

const KEYS: &[&str] = &[
    "name",
    "test_script",
    "test_script_file",
    "global_timeout",
    "nodes.a",
    "nodes.b-c",
    "defaults",
    "packages",
    "memory",
    "cpus",
    "vlans",
    "graphics",
    "kernel_params",
    "users.u",
    "users.u.uid",
    "files.\"/x\"",
    "files.\"/x\".text",
    "files.\"/x\".source",
    "files.\"/x\".mode",
    "services.s",
    "services.s.script",
    "services.s.exec_start",
    "services.s.type",
    "services.s.environment",
    "services.s.service_config.Restart",
    "firewall",
    "firewall.enable",
    "firewall.allowed_tcp_ports",
    "setup",
    "suite",
    "mirror",
    "snapshot",
    "pakages",
    "nodes",
    "nodes.A",
    "\"\"",
    "nodes.\"\"",
];
const VALUES: &[&str] = &[
    "1",
    "0",
    "-1",
    "128",
    "99999999999",
    "\"x\"",
    "\"\"",
    "true",
    "[]",
    "[1, 2]",
    "[\"curl\"]",
    "[\"Curl\"]",
    "{}",
    "{ a = 1 }",
    "'''\nx\n'''",
    "1.5",
    "1979-05-27",
    "[[]]",
    "[{}]",
    "\"files/motd.txt\"",
    "\"0644\"",
    "\"file:///m\"",
    "[65536]",
];

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop::sample::select(KEYS), prop::sample::select(VALUES))
            .prop_map(|(k, v)| format!("{k} = {v}")),
        prop::sample::select(KEYS).prop_map(|k| format!("[{k}]")),
        prop::sample::select(KEYS).prop_map(|k| format!("[[{k}]]")),
        "\\PC{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC*") {
        no_panic(&text);
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        no_panic(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_fixture(at in 0..VALID.len(), len in 0usize..40, insert in "\\PC{0,10}") {
        let start = char_boundary(VALID, at);
        let end = char_boundary(VALID, start + len);
        let text = format!("{}{insert}{}", &VALID[..start], &VALID[end..]);
        no_panic(&text);
    }

    #[test]
    fn keyword_soup(lines in prop::collection::vec(line(), 0..25)) {
        let text = format!("name = \"t\"\ntest_script = \"x\"\n{}\n", lines.join("\n"));
        no_panic(&text);
        no_panic(&lines.join("\n"));
    }
}

#[test]
fn table_of_odd_inputs() {
    let cases = [
        "",
        "\n",
        "=",
        "[",
        "[[",
        "\u{feff}name = \"t\"",
        "name = \"t\"\ntest_script = '''",
        "name = \"t\"\ntest_script = '''\n",
        "name = \"t\"\ntest_script = \"\"\"\r\n\"\"\"\n[nodes.a]",
        "name = \"t\"\ntest_script = \"x\"\nnodes = []",
        "name = \"t\"\ntest_script = \"x\"\nnodes = {a = []}",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nmemory = 9223372036854775807",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nmemory = -9223372036854775808",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nusers = []",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nfiles.\"/x\" = \"text\"",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nservices.x = true",
        "name = \"t\"\ntest_script = \"x\"\n[[nodes.a.users]]",
        "name = \"t\"\ntest_script_file = \"\"\n[nodes.a]",
        "name = \"t\"\ntest_script_file = \"/\"\n[nodes.a]",
        "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\nfiles.\"/x\".source = \"\"",
    ];
    for c in cases {
        no_panic(c);
    }
}
