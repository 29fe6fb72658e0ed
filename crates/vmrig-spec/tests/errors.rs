//! Every class of error, with its exact one-line message.

use std::path::{Path, PathBuf};

use vmrig_spec::{parse, ErrorKind, SpecError};

const HEAD: &str = "name = \"t\"\ntest_script = \"start_all()\"\n";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn err_at(path: &Path, text: &str) -> SpecError {
    match parse(text, path) {
        Ok(spec) => panic!("expected an error, got {spec:#?}"),
        Err(e) => e,
    }
}

fn err(text: &str) -> SpecError {
    err_at(Path::new("t.toml"), text)
}

/// Check the exact message and the kind; also that Display is one line and a help is given.
fn check(text: &str, kind: ErrorKind, expected: &str) {
    let e = err(text);
    assert_eq!(e.to_string(), expected, "for input:\n{text}");
    assert_eq!(e.kind(), kind, "for input:\n{text}");
    assert!(!e.to_string().contains('\n'));
    assert!(e.help_text().is_some(), "no help for {expected}");
}

fn with_head(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn unknown_keys() {
    let cases: &[(&str, &str)] = &[
        (
            "tset_script_file = \"x\"\n[nodes.a]\n",
            "t.toml:3:1: unknown top-level key `tset_script_file` (did you mean `test_script_file`?)",
        ),
        (
            "[nodes.server]\npakages = [\"curl\"]\n",
            "t.toml:4:1: unknown key `pakages` in node `server` (did you mean `packages`?)",
        ),
        (
            "[defaults]\nmemroy = 512\n[nodes.a]\n",
            "t.toml:4:1: unknown key `memroy` in `defaults` (did you mean `memory`?)",
        ),
        (
            "[nodes.a]\nusers.alice.extraGroups = [\"wheel\"]\n",
            "t.toml:4:13: unknown key `extraGroups` in user `alice` of node `a` (did you mean `groups`?)",
        ),
        (
            "[nodes.a.files.\"/etc/x\"]\ntext = \"hi\"\nmdoe = \"0644\"\n",
            "t.toml:5:1: unknown key `mdoe` in file `/etc/x` of node `a` (did you mean `mode`?)",
        ),
        (
            "[nodes.a.services.web]\nexec_start = \"/bin/true\"\nwantedBy = [\"x\"]\n",
            "t.toml:5:1: unknown key `wantedBy` in service `web` of node `a` (did you mean `wanted_by`?)",
        ),
        (
            "[nodes.a]\nfirewall = { allowed_tcp_port = [80] }\n",
            "t.toml:4:14: unknown key `allowed_tcp_port` in `firewall` of node `a` (did you mean `allowed_tcp_ports`?)",
        ),
        (
            "[nodes.a]\nfirewall.enabel = true\n",
            "t.toml:4:10: unknown key `enabel` in `firewall` of node `a` (did you mean `enable`?)",
        ),
        ("[nodes.a]\nzzzz = 1\n", "t.toml:4:1: unknown key `zzzz` in node `a`"),
    ];
    for (rest, expected) in cases {
        check(&with_head(rest), ErrorKind::UnknownKey, expected);
    }
}

#[test]
fn unknown_key_help() {
    let e = err(&with_head("[nodes.a]\nmemroy = 1\n"));
    assert_eq!(e.help_text(), Some("did you mean `memory`?"));
    let e = err(&with_head("[nodes.a]\nzzzz = 1\n"));
    assert!(e
        .help_text()
        .unwrap()
        .starts_with("valid keys here: packages, memory,"));
    // A top-level key written after a table header lands in that table: say so.
    let e = err("name = \"t\"\n[nodes.a]\ntest_script = \"x\"\n");
    assert_eq!(
        e.to_string(),
        "t.toml:3:1: unknown key `test_script` in node `a`"
    );
    assert!(e.help_text().unwrap().contains("is a top-level key"));
}

#[test]
fn wrong_types() {
    let cases: &[(&str, &str)] = &[
        (
            "[nodes.a]\nmemory = \"big\"\n",
            "t.toml:4:10: wrong type for `memory` in node `a`: expected an integer, found a string",
        ),
        (
            "[nodes.a]\npackages = [\"curl\", 3]\n",
            "t.toml:4:21: wrong type for `packages[1]` in node `a`: expected a string, found an integer",
        ),
        (
            "[nodes.a]\npackages = \"curl\"\n",
            "t.toml:4:12: wrong type for `packages` in node `a`: expected an array of strings, found a string",
        ),
        (
            "[nodes.a]\ngraphics = \"yes\"\n",
            "t.toml:4:12: wrong type for `graphics` in node `a`: expected a boolean, found a string",
        ),
        (
            "nodes.a = 3\n",
            "t.toml:3:11: wrong type for `nodes.a`: expected a table, found an integer",
        ),
        (
            "[[nodes]]\nname = \"x\"\n",
            "t.toml:3:1: wrong type for `nodes`: expected a table, found an array of tables",
        ),
        (
            "[nodes.a.files.\"/etc/x\"]\ntext = \"x\"\nmode = 0o644\n",
            "t.toml:5:8: wrong type for `mode` in file `/etc/x` of node `a`: expected a string, found an integer",
        ),
        (
            "[nodes.a]\nvlans = [\"1\"]\n",
            "t.toml:4:10: wrong type for `vlans[0]` in node `a`: expected an integer, found a string",
        ),
        (
            "[nodes.a.services.x]\nenvironment.A = [1]\n",
            "t.toml:4:17: wrong type for `environment.A` in service `x` of node `a`: expected a string, number or boolean, found an array",
        ),
        (
            "[nodes.a.services.x]\nservice_config.Restart = { a = 1 }\n",
            "t.toml:4:26: wrong type for `service_config.Restart` in service `x` of node `a`: expected a string, number, boolean or an array of them, found a table",
        ),
    ];
    for (rest, expected) in cases {
        check(&with_head(rest), ErrorKind::WrongType, expected);
    }
    let e = err("name = 3\ntest_script = \"x\"\n[nodes.a]\n");
    assert_eq!(
        e.to_string(),
        "t.toml:1:8: wrong type for `name`: expected a string, found an integer"
    );
}

#[test]
fn missing_and_conflicting() {
    check(
        "test_script = \"x\"\n[nodes.a]\n",
        ErrorKind::Missing,
        "t.toml: missing top-level key `name`",
    );
    check(
        "name = \"x\"\n[nodes.a]\n",
        ErrorKind::Missing,
        "t.toml: missing test script: set `test_script` or `test_script_file`",
    );
    check(
        &with_head("test_script_file = \"x.py\"\n[nodes.a]\n"),
        ErrorKind::Conflict,
        "t.toml:3:1: both `test_script` and `test_script_file` are set",
    );
    check(
        &with_head("[nodes.a.services.web]\nscript = \"x\"\nexec_start = \"y\"\n"),
        ErrorKind::Conflict,
        "t.toml:5:1: both `script` and `exec_start` are set in service `web` of node `a`",
    );
    check(
        &with_head("[nodes.a.files.\"/x\"]\nmode = \"0644\"\n"),
        ErrorKind::Missing,
        "t.toml:3:16: file `/x` of node `a` has neither `text` nor `source`",
    );
}

#[test]
fn text_and_source_conflict() {
    let path = fixtures().join("conflict.toml");
    let e = err_at(
        &path,
        &with_head("[nodes.a.files.\"/x\"]\ntext = \"x\"\nsource = \"files/motd.txt\"\n"),
    );
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:5:1: both `text` and `source` are set in file `/x` of node `a`",
            path.display()
        )
    );
}

#[test]
fn bad_node_names() {
    let cases: &[(&str, &str)] = &[
        (
            "[nodes.Server]\n",
            "t.toml:3:8: invalid node name `Server`: must match [a-z][a-z0-9_-]*",
        ),
        (
            "[nodes.1abc]\n",
            "t.toml:3:8: invalid node name `1abc`: must match [a-z][a-z0-9_-]*",
        ),
        (
            "[nodes._ab]\n",
            "t.toml:3:8: invalid node name `_ab`: must match [a-z][a-z0-9_-]*",
        ),
        (
            "[nodes.a-b]\n[nodes.a_b]\n",
            "t.toml:4:8: invalid node name `a_b`: node `a-b` has the same Python variable or host name",
        ),
        (
            "[nodes.ab]\n[nodes.a_b]\n",
            "t.toml:4:8: invalid node name `a_b`: node `ab` has the same Python variable or host name",
        ),
        (
            "[nodes.class]\n",
            "t.toml:3:8: invalid node name `class`: `class` is a Python keyword",
        ),
        (
            "[nodes.start-all]\n",
            "t.toml:3:8: invalid node name `start-all`: `start_all` is a test driver global",
        ),
        (
            "[nodes.t]\n",
            "t.toml:3:8: invalid node name `t`: `t` is a test driver global",
        ),
        (
            "nodes.vlans = {}\n",
            "t.toml:3:7: invalid node name `vlans`: `vlans` is a test driver global",
        ),
    ];
    for (rest, expected) in cases {
        check(&with_head(rest), ErrorKind::Invalid, expected);
    }
    let long = "a".repeat(64);
    check(
        &with_head(&format!("[nodes.{long}]\n")),
        ErrorKind::Invalid,
        &format!("t.toml:3:8: invalid node name `{long}`: longer than 63 characters"),
    );
    // 63 characters is fine, and so is `machine` (NixOS tests use it for a single node).
    let ok = "b".repeat(63);
    parse(
        &with_head(&format!("[nodes.{ok}]\n[nodes.machine]\n")),
        Path::new("t.toml"),
    )
    .unwrap();
}

#[test]
fn invalid_values() {
    let cases: &[(&str, &str)] = &[
        (
            "[nodes.a]\nmemory = 64\n",
            "t.toml:4:10: invalid `memory` in node `a`: 64 MiB is below the minimum of 128 MiB",
        ),
        (
            "[nodes.a]\ncpus = 0\n",
            "t.toml:4:8: invalid `cpus` in node `a`: 0 is out of range (1..=1024)",
        ),
        (
            "[nodes.a]\npackages = [\"curl\", \"Nginx\"]\n",
            "t.toml:4:21: invalid package name `Nginx` in node `a`",
        ),
        (
            "[defaults]\npackages = [\"x\"]\n[nodes.a]\n",
            "t.toml:4:13: invalid package name `x` in `defaults`",
        ),
        (
            "[nodes.a]\nusers.bob.packages = [\"-x\"]\n",
            "t.toml:4:23: invalid package name `-x` in user `bob` of node `a`",
        ),
        (
            "[nodes.a]\nfiles.\"etc/motd\".text = \"hi\"\n",
            "t.toml:4:7: file path `etc/motd` in node `a` is not absolute",
        ),
        (
            "[nodes.a]\nfiles.\"/etc/\".text = \"hi\"\n",
            "t.toml:4:7: file path `/etc/` in node `a` is not a file path",
        ),
        (
            "[nodes.a]\nvlans = [1, 2, 1]\n",
            "t.toml:4:16: VLAN 1 is listed twice in node `a`",
        ),
        (
            "[nodes.a]\nvlans = [256]\n",
            "t.toml:4:10: invalid VLAN 256 in node `a`: VLANs are 1..=255",
        ),
        (
            "[nodes.a]\nvlans = [0]\n",
            "t.toml:4:10: invalid VLAN 0 in node `a`: VLANs are 1..=255",
        ),
        (
            "[nodes.a.files.\"/x\"]\ntext = \"\"\nmode = \"0999\"\n",
            "t.toml:5:8: invalid `mode` `0999` in file `/x` of node `a`",
        ),
        (
            "[nodes.a]\nfirewall.allowed_udp_ports = [0]\n",
            "t.toml:4:31: invalid port 0 in `allowed_udp_ports` in `firewall` of node `a`",
        ),
        (
            "[nodes.a]\nfirewall.allowed_tcp_ports = [65536]\n",
            "t.toml:4:31: invalid port 65536 in `allowed_tcp_ports` in `firewall` of node `a`",
        ),
        (
            "[nodes.a.services.x]\ntype = \"oneshoot\"\n",
            "t.toml:4:8: invalid service `type` `oneshoot` in service `x` of node `a`",
        ),
        (
            "[nodes.a]\nsuite = \"Bookworm\"\n",
            "t.toml:4:9: invalid `suite` `Bookworm` in node `a`",
        ),
        (
            "[nodes.a]\nsuite = \"sid-typo\"\n",
            "t.toml:4:9: unsupported `suite` `sid-typo` in node `a`",
        ),
        (
            "[nodes.a]\nsuite = \"buster\"\n",
            "t.toml:4:9: unsupported `suite` `buster` in node `a`",
        ),
        (
            "[nodes.a]\nsuite = \"trixy\"\n",
            "t.toml:4:9: unsupported `suite` `trixy` in node `a` (did you mean `trixie`?)",
        ),
        (
            "[nodes.a]\nmirror = \"my-mirror\"\n",
            "t.toml:4:10: invalid `mirror` `my-mirror` in node `a`: expected a URL",
        ),
        (
            "[nodes.a]\nusers.Bob = {}\n",
            "t.toml:4:7: invalid user name `Bob` in node `a`",
        ),
        (
            "[nodes.a]\nusers.bob.home = \"home/bob\"\n",
            "t.toml:4:18: `home` `home/bob` in user `bob` of node `a` is not absolute",
        ),
        (
            "[nodes.a.services.\"bad name\"]\n",
            "t.toml:3:19: invalid service name `bad name` in node `a`",
        ),
        (
            "[nodes.a.services.x]\nservice_config.restart = \"always\"\n",
            "t.toml:4:16: invalid `[Service]` setting name `restart` in service `x` of node `a`",
        ),
        (
            "[nodes.a.sockets.\"web@\"]\n",
            "t.toml:3:18: invalid socket name `web@` in node `a`",
        ),
        (
            "[nodes.a.sockets.web]\nsocket_config.backlog = 8\n",
            "t.toml:4:15: invalid `[Socket]` setting name `backlog` in socket `web` of node `a`",
        ),
    ];
    for (rest, expected) in cases {
        check(&with_head(rest), ErrorKind::Invalid, expected);
    }
    check(
        "name = \"t\"\ntest_script = \"x\"\nglobal_timeout = 0\n[nodes.a]\n",
        ErrorKind::Invalid,
        "t.toml:3:18: invalid `global_timeout`: 0 s is below the minimum of 1 s",
    );
    check(
        "name = \"\"\ntest_script = \"x\"\n[nodes.a]\n",
        ErrorKind::Invalid,
        "t.toml:1:8: invalid `name`: it must be one non-empty line",
    );
    let e = err(&with_head("[nodes.a.services.x]\ntype = \"oneshoot\"\n"));
    assert_eq!(e.help_text(), Some("did you mean `oneshot`?"));
    // An unsupported suite names the supported ones.
    let e = err(&with_head("[nodes.a]\nsuite = \"buster\"\n"));
    assert_eq!(
        e.help_text(),
        Some("supported suites: `trixie`, `bookworm` (Debian 13, the default, and Debian 12)")
    );
}

#[test]
fn syntax_errors() {
    check(
        &with_head("[nodes.a\n"),
        ErrorKind::Syntax,
        "t.toml:3:9: invalid TOML: invalid table header; expected `.`, `]`",
    );
    check(
        &with_head("[nodes.a]\nmemory = 1\nmemory = 2\n"),
        ErrorKind::Syntax,
        "t.toml:5:1: invalid TOML: duplicate key `memory` in table `nodes.a`",
    );
}

#[test]
fn missing_files() {
    let dir = fixtures();
    let path = dir.join("missing-script.toml");
    let e = err_at(
        &path,
        "name = \"t\"\ntest_script_file = \"nope.py\"\n[nodes.a]\n",
    );
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:20: cannot read `test_script_file` {}: No such file or directory (os error 2)",
            path.display(),
            dir.join("nope.py").display()
        )
    );

    let e = err_at(
        &path,
        &with_head("[nodes.a]\nfiles.\"/etc/motd\".source = \"nope.txt\"\n"),
    );
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4:28: cannot read `source` of file `/etc/motd` of node `a`: {}: No such file or directory (os error 2)",
            path.display(),
            dir.join("nope.txt").display()
        )
    );

    let e = vmrig_spec::load(&dir.join("does-not-exist.toml")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(
        e.to_string(),
        format!(
            "{}: cannot read test file: No such file or directory (os error 2)",
            dir.join("does-not-exist.toml").display()
        )
    );
}

#[test]
fn load_reports_fixture_typo() {
    let path = fixtures().join("typo.toml");
    let e = vmrig_spec::load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:5:1: unknown key `pakages` in node `server` (did you mean `packages`?)",
            path.display()
        )
    );
    assert_eq!((e.line(), e.column()), (Some(5), Some(1)));
}

#[test]
fn columns_count_characters() {
    // A multi-byte character before the error moves the column by one, not by its bytes.
    let e = err(&with_head("[nodes.a]\nusers.\"é\" = {}\n"));
    assert_eq!(
        e.to_string(),
        "t.toml:4:7: invalid user name `é` in node `a`"
    );
    let e = err(&with_head("[nodes.a]\nkernel_params = [\"é\", 1]\n"));
    assert_eq!(
        e.to_string(),
        "t.toml:4:23: wrong type for `kernel_params[1]` in node `a`: expected a string, found an integer"
    );
}

#[test]
fn miette_rendering() {
    use miette::Diagnostic;
    let e = err(&with_head("[nodes.server]\npakages = [\"curl\"]\n"));
    assert_eq!(
        e.code().map(|c| c.to_string()).as_deref(),
        Some("vmrig::spec::unknown_key")
    );
    let labels: Vec<_> = e.labels().unwrap().collect();
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].label(), Some("unknown key"));
    assert_eq!(labels[0].offset(), HEAD.len() + "[nodes.server]\n".len());
    assert_eq!(labels[0].len(), "pakages".len());
    assert!(e.source_code().is_some());
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, &e)
        .unwrap();
    assert!(out.contains("pakages = [\"curl\"]"), "{out}");
    assert!(out.contains("did you mean `packages`?"), "{out}");
}

#[test]
fn control_characters_in_values_are_escaped_to_keep_one_line() {
    check(
        &with_head("[nodes.web]\nmirror = \"file:///a\\n-b\"\n"),
        ErrorKind::Invalid,
        "t.toml:4:10: invalid `mirror` `file:///a\\n-b` in node `web`: expected a URL",
    );
}

#[test]
fn a_script_file_that_is_not_a_regular_file_is_refused() {
    let e = err("name = \"t\"\ntest_script_file = \"/dev/zero\"\n[nodes.a]\n");
    assert_eq!(
        e.to_string(),
        "t.toml:2:20: cannot read `test_script_file` /dev/zero: not a regular file"
    );
}

/// A fresh directory for one test (removed at the end).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("vmrig-spec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory `source` is checked where it is named: a special file in its tree, a special
/// file as the source itself, and `mode` (a copied tree keeps its host modes) are errors at
/// their line and column, with the fix.
#[test]
fn directory_sources() {
    let tmp = TempDir::new("dirs");
    let app = tmp.0.join("app");
    std::fs::create_dir_all(app.join("run")).unwrap();
    std::fs::write(app.join("ok.txt"), "ok").unwrap();
    std::os::unix::fs::symlink("/nonexistent/outside", app.join("link")).unwrap();
    let path = tmp.0.join("t.toml");

    // Files, directories and symlinks (even pointing outside, even dangling) are fine.
    let spec = parse(
        &with_head("[nodes.a.files.\"/opt/app\"]\nsource = \"app/\"\nowner = \"nobody\"\n"),
        &path,
    )
    .unwrap();
    assert_eq!(
        spec.nodes["a"].files["/opt/app"].source.as_deref(),
        Some(app.as_path())
    );

    let _socket = std::os::unix::net::UnixListener::bind(app.join("run/app.sock")).unwrap();
    let e = err_at(
        &path,
        &with_head("[nodes.a.files.\"/opt/app\"]\nsource = \"app/\"\n"),
    );
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4:10: cannot copy `source` of file `/opt/app` of node `a`: app/run/app.sock is a socket",
            path.display()
        )
    );
    assert_eq!(
        e.help_text(),
        Some("a directory `source` may hold only files, directories and symlinks: remove app/run/app.sock from it")
    );
    std::fs::remove_file(app.join("run/app.sock")).unwrap();

    check(
        &with_head("[nodes.a]\nfiles.\"/x\".source = \"/dev/null\"\n"),
        ErrorKind::Invalid,
        "t.toml:4:21: cannot copy `source` of file `/x` of node `a`: /dev/null is a character device",
    );

    let e = err_at(
        &path,
        &with_head("[nodes.a.files.\"/opt/app\"]\nmode = \"0755\"\nsource = \"app\"\n"),
    );
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4:1: `mode` is set for a directory `source` in file `/opt/app` of node `a`",
            path.display()
        )
    );
    assert_eq!(
        e.help_text(),
        Some("remove `mode`: the tree keeps the modes it has on the host (`chmod` them there)")
    );
}
