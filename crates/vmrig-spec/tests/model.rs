//! The model: fixtures, defaults merge, script lines, image inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vmrig_spec::*;

const HEAD: &str = "name = \"t\"\ntest_script = \"start_all()\"\n";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ok(text: &str) -> TestSpec {
    parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"))
}

/// Every line of the script must be found, verbatim, at `first_line + i` of `file_text`.
fn assert_lines_map(script: &ScriptSource, file_text: &str) {
    let file_lines: Vec<&str> = file_text.lines().collect();
    for (i, line) in script.text.lines().enumerate() {
        let n = script.first_line + i;
        assert_eq!(
            file_lines.get(n - 1).copied(),
            Some(line),
            "script line {} should be file line {n}",
            i + 1
        );
    }
}

#[test]
fn client_server_fixture() {
    let path = fixtures().join("client-server.toml");
    let spec = load(&path).unwrap();
    assert_eq!(spec.name, "client-server");
    assert_eq!(spec.path, path);
    assert_eq!(spec.global_timeout, 3600);
    assert_eq!(spec.script.filename, path);
    assert_eq!(spec.script.first_line, 4);
    assert!(spec.script.text.starts_with("start_all()\n"));
    assert_lines_map(&spec.script, &std::fs::read_to_string(&path).unwrap());
    assert_eq!(spec.nodes.keys().collect::<Vec<_>>(), ["client", "server"]);
    let server = &spec.nodes["server"];
    assert_eq!(server.packages, ["nginx-light"]);
    assert_eq!(server.firewall.allowed_tcp_ports, [80]);
    assert!(server.firewall.is_enabled());
    let client = &spec.nodes["client"];
    assert!(!client.firewall.is_enabled());
    // Built-in defaults.
    assert_eq!(client.memory, 1024);
    assert_eq!(client.cpus, 1);
    assert_eq!(client.vlans, [1]);
    assert!(!client.graphics);
    assert_eq!(client.suite, "trixie");
    assert_eq!(client.mirror, None);
    assert!(client.snapshot);
    assert!(client.users.is_empty() && client.files.is_empty() && client.services.is_empty());
}

#[test]
fn full_fixture_and_defaults_merge() {
    let path = fixtures().join("full.toml");
    let spec = load(&path).unwrap();
    assert_eq!(spec.global_timeout, 600);
    assert_eq!(spec.script.first_line, 4);
    assert_lines_map(&spec.script, &std::fs::read_to_string(&path).unwrap());

    let web = &spec.nodes["web-1"];
    assert_eq!(web.python_name(), "web_1");
    // Lists: defaults first; packages without duplicates.
    assert_eq!(web.packages, ["curl", "iproute2", "nginx-light"]);
    assert_eq!(web.kernel_params, ["quiet", "console=ttyS0"]);
    assert_eq!(
        web.setup,
        [
            "echo defaults > /etc/defaults-ran",
            "echo node > /etc/node-ran"
        ]
    );
    // Scalars: node wins, else defaults.
    assert_eq!(web.memory, 512);
    assert_eq!(web.cpus, 2);
    assert!(web.graphics);
    assert_eq!(web.suite, "trixie");
    assert_eq!(web.mirror.as_deref(), Some("file:///srv/debian-mirror"));
    assert!(!web.snapshot);
    // vlans: replaced.
    assert_eq!(web.vlans, [2]);
    // Firewall ports concatenated (deduplicated).
    assert_eq!(web.firewall.allowed_tcp_ports, [22, 80]);
    assert_eq!(web.firewall.allowed_udp_ports, [53]);
    assert!(web.firewall.is_enabled());
    // Maps: node entries replace the default's entry whole.
    assert_eq!(
        web.users["alice"],
        UserSpec {
            uid: Some(1001),
            shell: Some("/bin/bash".into()),
            ..UserSpec::default()
        }
    );
    assert_eq!(
        web.users["svc"],
        UserSpec {
            system: true,
            home: Some("/var/lib/svc".into()),
            password: Some("secret".into()),
            ..UserSpec::default()
        }
    );
    assert_eq!(
        web.files["/etc/motd"],
        FileSpec {
            text: None,
            source: Some(fixtures().join("files/motd.txt")),
            mode: Some("0644".into()),
            owner: Some("root".into()),
            group: Some("root".into()),
        }
    );
    assert!(web.files["/etc/motd"]
        .source
        .as_ref()
        .unwrap()
        .is_absolute());
    assert_eq!(web.files["/etc/motd"].mode_bits(), Some(0o644));
    assert_eq!(web.files["/etc/hello.conf"].mode_bits(), Some(0o600));
    // Services: default entry kept, node entries added.
    assert_eq!(
        web.services.keys().collect::<Vec<_>>(),
        ["cron", "hello", "ssh"]
    );
    let ssh = &web.services["ssh"];
    assert!(ssh.enable && !ssh.is_new() && ssh.wanted_by.is_empty());
    assert!(!web.services["cron"].enable);
    let hello = &web.services["hello"];
    assert!(hello.is_new());
    assert_eq!(hello.script.as_deref(), Some("echo hello; sleep infinity"));
    assert_eq!(hello.wanted_by, ["multi-user.target"]);
    assert_eq!(hello.after, ["network.target"]);
    assert_eq!(hello.requires, ["network.target"]);
    assert_eq!(hello.user.as_deref(), Some("svc"));
    assert_eq!(hello.type_.as_deref(), Some("simple"));
    let env: BTreeMap<String, String> = [("COUNT", "3"), ("DEBUG", "true"), ("GREETING", "hello")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(hello.environment, env);
    assert_eq!(
        hello.service_config["Restart"],
        ServiceConfigValue::One("always".into())
    );
    assert_eq!(hello.service_config["RestartSec"].values(), ["1"]);
    assert_eq!(
        hello.service_config["ExecStartPre"],
        ServiceConfigValue::Many(vec!["/bin/true".into(), "/bin/echo pre".into()])
    );

    // A node that sets nothing gets the defaults as they are.
    let plain = &spec.nodes["plain"];
    assert_eq!(plain.packages, ["curl", "iproute2"]);
    assert_eq!(plain.memory, 512);
    assert_eq!(plain.vlans, [1, 2]);
    assert_eq!(plain.kernel_params, ["quiet"]);
    assert_eq!(plain.firewall.allowed_tcp_ports, [22]);
    assert_eq!(plain.firewall.enable, Some(false));
    assert!(!plain.firewall.is_enabled());
    assert_eq!(plain.users["alice"].uid, Some(1000));
    assert_eq!(plain.users["alice"].groups, ["wheel"]);
    assert_eq!(
        plain.files["/etc/motd"].text.as_deref(),
        Some("default motd\n")
    );
    assert_eq!(plain.suite, "trixie");

    // User packages are part of the image.
    assert_eq!(plain.image_inputs().packages, ["curl", "iproute2", "vim"]);
    // web-1 replaced alice (no vim).
    assert_eq!(
        web.image_inputs().packages,
        ["curl", "iproute2", "nginx-light"]
    );
}

#[test]
fn empty_vlans_replace_defaults() {
    let spec = ok(&format!(
        "{HEAD}[defaults]\nvlans = [3]\n[nodes.a]\nvlans = []\n[nodes.b]\n"
    ));
    assert!(spec.nodes["a"].vlans.is_empty());
    assert_eq!(spec.nodes["b"].vlans, [3]);
}

#[test]
fn firewall_enable_from_defaults() {
    let spec = ok(&format!(
        "{HEAD}[defaults]\nfirewall.enable = true\n[nodes.a]\n[nodes.b]\nfirewall.enable = false\nfirewall.allowed_tcp_ports = [1]\n"
    ));
    assert!(spec.nodes["a"].firewall.is_enabled());
    assert!(!spec.nodes["b"].firewall.is_enabled());
}

#[test]
fn service_wanted_by_defaults() {
    let spec = ok(&format!(
        "{HEAD}[nodes.a.services]\nx.exec_start = \"/bin/true\"\ny = {{ script = \"true\", wanted_by = [] }}\nz = {{ wanted_by = [\"b.target\"] }}\n"
    ));
    let s = &spec.nodes["a"].services;
    assert_eq!(s["x"].wanted_by, ["multi-user.target"]);
    assert!(s["y"].wanted_by.is_empty());
    assert_eq!(s["z"].wanted_by, ["b.target"]);
    assert_eq!(ServiceSpec::unit_name("x"), "x.service");
    assert_eq!(ServiceSpec::unit_name("x.socket"), "x.socket");
}

#[test]
fn first_line_inline_variants() {
    // ''' followed by a newline: the text starts on the next line.
    let text = "name = \"t\"\n\n\ntest_script = '''\nstart_all()\nmachine.succeed(\"x\")\n'''\n[nodes.machine]\n";
    let spec = ok(text);
    assert_eq!(spec.script.first_line, 5);
    assert_eq!(spec.script.first_column, 1);
    assert_eq!(spec.script.filename, Path::new("t.toml"));
    assert_lines_map(&spec.script, text);

    // ''' with text on the same line.
    let text =
        "name = \"t\"\ntest_script = '''start_all()\nmachine.succeed(\"x\")'''\n[nodes.machine]\n";
    let spec = ok(text);
    assert_eq!(spec.script.first_line, 2);
    assert_eq!(spec.script.first_column, 18);
    assert_eq!(spec.script.text, "start_all()\nmachine.succeed(\"x\")");

    // A one-line basic string.
    let spec = ok("name = \"t\"\n\ntest_script = \"start_all()\"\n[nodes.machine]\n");
    assert_eq!(spec.script.first_line, 3);
    assert_eq!(spec.script.first_column, 16);

    // """ followed by a newline.
    let text = "test_script = \"\"\"\nstart_all()\n\"\"\"\nname = \"t\"\n[nodes.machine]\n";
    let spec = ok(text);
    assert_eq!(spec.script.first_line, 2);
    assert_lines_map(&spec.script, text);

    // CRLF line endings.
    let text =
        "name = \"t\"\r\ntest_script = '''\r\nstart_all()\r\nx = 1\r\n'''\r\n[nodes.machine]\r\n";
    let spec = ok(text);
    assert_eq!(spec.script.first_line, 3);
    assert_lines_map(&spec.script, text);

    // Extra whitespace around `=`.
    let text = "name = \"t\"\ntest_script   =    '''\nstart_all()\n'''\n[nodes.machine]\n";
    assert_eq!(ok(text).script.first_line, 3);

    // Text and line after a multi-byte character earlier in the file.
    let text = "name = \"tést\"\ntest_script = '''\nstart_all()\n'''\n[nodes.machine]\n";
    assert_eq!(ok(text).script.first_line, 3);
}

#[test]
fn first_line_script_file() {
    let path = fixtures().join("script-file.toml");
    let spec = load(&path).unwrap();
    assert_eq!(spec.script.first_line, 1);
    assert_eq!(spec.script.filename, fixtures().join("script-file.py"));
    assert_eq!(spec.script.text, "start_all()\nmachine.succeed(\"true\")\n");
    assert_eq!(spec.nodes["machine"].python_name(), "machine");
}

fn inputs(suite: &str, mirror: Option<&str>, packages: &[&str], setup: &[&str]) -> ImageInputs {
    let spec = ok(&format!(
        "{HEAD}[nodes.a]\nsuite = \"{suite}\"\n{}packages = {:?}\nsetup = {:?}\n",
        mirror
            .map(|m| format!("mirror = \"{m}\"\n"))
            .unwrap_or_default(),
        packages,
        setup
    ));
    spec.nodes["a"].image_inputs()
}

#[test]
fn image_inputs_canonical_and_stable() {
    let a = inputs(
        "bookworm",
        None,
        &["curl", "nginx-light", "curl"],
        &["true"],
    );
    assert_eq!(
        a.canonical_json(),
        r#"{"suite":"bookworm","mirror":null,"packages":["curl","nginx-light"],"setup":["true"]}"#
    );
    // Pinned: a change here changes every image name in every store.
    assert_eq!(a.hash(), "132271454fe13705ba90108d52fa94af");
    assert_eq!(a.hash().len(), 32);
    assert!(a.hash().bytes().all(|c| c.is_ascii_hexdigit()));

    // Order and duplicates of packages do not matter.
    let b = inputs("bookworm", None, &["nginx-light", "curl"], &["true"]);
    assert_eq!(a.hash(), b.hash());

    // A package only a user asks for is installed too, but moved off the system PATH:
    // that is another image. Listed by the node as well, it is an ordinary package.
    let spec = ok(&format!(
        "{HEAD}[nodes.a]\nsuite = \"bookworm\"\npackages = [\"nginx-light\"]\nsetup = [\"true\"]\nusers.bob.packages = [\"curl\"]\nmemory = 2048\ngraphics = true\n"
    ));
    let user_only = spec.nodes["a"].image_inputs();
    assert_eq!(user_only.packages, a.packages);
    assert_eq!(user_only.user_only_packages, vec!["curl".to_string()]);
    assert_ne!(user_only.hash(), a.hash());
    let spec = ok(&format!(
        "{HEAD}[nodes.a]\nsuite = \"bookworm\"\npackages = [\"nginx-light\", \"curl\"]\nsetup = [\"true\"]\nusers.bob.packages = [\"curl\"]\n"
    ));
    assert_eq!(spec.nodes["a"].image_inputs().hash(), a.hash());

    // Anything else that goes in changes the hash.
    let others = [
        inputs("trixie", None, &["curl", "nginx-light"], &["true"]),
        inputs(
            "bookworm",
            Some("file:///srv/other-mirror"),
            &["curl", "nginx-light"],
            &["true"],
        ),
        inputs("bookworm", None, &["curl"], &["true"]),
        inputs("bookworm", None, &["curl", "nginx-light", "vim"], &["true"]),
        inputs("bookworm", None, &["curl", "nginx-light"], &[]),
        inputs(
            "bookworm",
            None,
            &["curl", "nginx-light"],
            &["true", "true"],
        ),
        inputs("bookworm", None, &["curl", "nginx-light"], &["false"]),
    ];
    let mut seen = std::collections::BTreeSet::from([a.hash()]);
    for o in &others {
        assert!(seen.insert(o.hash()), "hash collision for {o:?}");
    }
    // Setup order matters.
    let x = inputs("bookworm", None, &["curl"], &["a", "b"]);
    let y = inputs("bookworm", None, &["curl"], &["b", "a"]);
    assert_ne!(x.hash(), y.hash());
}

#[test]
fn spec_serializes() {
    // The whole model is Serialize, for result-cache keys and reports.
    let spec = load(&fixtures().join("full.toml")).unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.contains("\"type\":\"simple\""));
}

/// Upstream's retry.nix has `nodes = { }`: a test may have no machines.
#[test]
fn a_test_without_nodes_parses() {
    for text in [
        "name = \"t\"\ntest_script = \"pass\"\n",
        "name = \"t\"\ntest_script = \"pass\"\n[nodes]\n",
    ] {
        let spec = vmrig_spec::parse(text, std::path::Path::new("t.toml")).unwrap();
        assert!(spec.nodes.is_empty());
    }
}

#[test]
fn a_file_for_the_rust_api_may_leave_out_the_script() {
    let path = fixtures().join("machines-only.toml");
    let spec = load_machines(&path).unwrap();
    assert_eq!(spec.name, "machines-only");
    assert_eq!(spec.nodes.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(spec.script.text, "");
    assert_eq!(spec.script.filename, path);
    // `vmrig run` (load) still wants one.
    let err = load(&path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Missing);
    // A script that is there is read as by `load`.
    let with_script = load_machines(&fixtures().join("client-server.toml")).unwrap();
    assert!(with_script.script.text.starts_with("start_all()\n"));
}

/// A local package file: out of `packages`, into `local_debs` (defaults first, one per
/// path); the image inputs name it by content only, and equal contents at other paths
/// make equal inputs.
#[test]
fn local_debs_merge_and_enter_the_image_inputs_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let deb = |name: &str, body: &str| {
        let member =
            format!("debian-binary   0           0     0     100644  4         `\n2.0\n{body}");
        std::fs::write(dir.path().join(name), format!("!<arch>\n{member}")).unwrap();
    };
    deb("base.deb", "base");
    deb("app.deb", "app");
    std::fs::create_dir(dir.path().join("copy")).unwrap();
    std::fs::copy(dir.path().join("app.deb"), dir.path().join("copy/app.deb")).unwrap();
    let text = format!(
        "{HEAD}[defaults]\npackages = [\"./base.deb\"]\n[nodes.a]\npackages = [\"curl\", \"./app.deb\", \"./base.deb\"]\n[nodes.b]\npackages = [\"curl\", \"./copy/app.deb\"]\n"
    );
    let spec = parse(&text, &dir.path().join("t.toml")).unwrap_or_else(|e| panic!("{e}"));
    let a = &spec.nodes["a"];
    assert_eq!(a.packages, ["curl"]);
    let written: Vec<&str> = a.local_debs.iter().map(|d| d.written.as_str()).collect();
    assert_eq!(written, ["./base.deb", "./app.deb"]);
    assert_eq!(a.local_debs[1].path, dir.path().join("app.deb"));
    let inputs = a.image_inputs();
    let json = inputs.canonical_json();
    assert!(json.contains(&a.local_debs[1].sha256), "{json}");
    assert!(!json.contains("app.deb"), "{json}");
    // b: the same app at another path, and the default's base package.
    assert_eq!(spec.nodes["b"].image_inputs().hash(), inputs.hash());
    assert_eq!(
        spec.places
            .string_in(&["nodes", "a", "packages"], "./app.deb"),
        Some(Place {
            line: 6,
            column: 21
        })
    );
}
