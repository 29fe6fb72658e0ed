//! The static check of test scripts (`check_script`) and the typed stubs, against the
//! host's python3: golden findings, and the dynamic code the check must leave alone.

use std::path::{Path, PathBuf};

use vmrig_python::{check_script, stubs, Finding, ScriptError, ScriptNames, ScriptSource};

fn python() -> &'static Path {
    Path::new("python3")
}

/// A script written in `t.toml` from line `first_line` on.
fn src(text: &str, first_line: usize) -> ScriptSource {
    ScriptSource {
        text: text.to_owned(),
        filename: PathBuf::from("t.toml"),
        first_line,
        first_column: 1,
    }
}

fn names() -> ScriptNames {
    ScriptNames::new(["server", "client", "my-node"], &[1, 2])
}

fn findings(text: &str) -> Vec<Finding> {
    match check_script(python(), &src(text, 3), &names()) {
        Ok(()) => Vec::new(),
        Err(ScriptError::Findings(f)) => f.0,
        Err(e) => panic!("not findings: {e}"),
    }
}

fn clean(text: &str) {
    let found = findings(text);
    assert!(
        found.is_empty(),
        "flagged:\n{}\nin:\n{text}",
        found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_misspelled_method_on_the_last_line_names_line_column_and_the_method() {
    let found = findings(
        "start_all()\nserver.wait_for_unit(\"nginx.service\")\n    \nserver.wait_for_unti(\"nginx.service\")",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let f = &found[0];
    // Script line 4 is file line 6; the column is that of `wait_for_unti`.
    assert_eq!((f.line, f.column), (6, 8), "{f}");
    assert_eq!(
        f.message,
        "machine `server` has no attribute `wait_for_unti`; did you mean `wait_for_unit`?"
    );
    assert_eq!(
        f.to_string(),
        "t.toml:6:8: machine `server` has no attribute `wait_for_unti`; did you mean \
         `wait_for_unit`?\n    server.wait_for_unti(\"nginx.service\")\n           ^"
    );
}

#[test]
fn an_unknown_keyword_argument_is_named_with_the_closest_one() {
    let found = findings("client.succeed(\"curl server\", timout=5)\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].line, found[0].column), (3, 31));
    assert_eq!(
        found[0].message,
        "unknown keyword argument `timout` of `client.succeed`; did you mean `timeout`? \
         (it takes `client.succeed(*commands, timeout=...)`)"
    );
    // The driver's functions too.
    let found = findings("retry(lambda last: True, timeout_secs=3)\n");
    assert!(
        found[0].message.starts_with(
            "unknown keyword argument `timeout_secs` of `retry`; did you mean `timeout_seconds`?"
        ),
        "{found:?}"
    );
}

#[test]
fn too_many_and_too_few_positional_arguments() {
    let found = findings("server.wait_for_open_port(80, \"localhost\", 10, 4)\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].column, 48, "points at the first extra argument");
    assert_eq!(
        found[0].message,
        "`server.wait_for_open_port` takes 3 positional arguments but 4 were given \
         (it takes `server.wait_for_open_port(port, addr=..., timeout=...)`)"
    );
    let found = findings("start_all(1)\nvlan2.set_loss()\n");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0]
        .message
        .starts_with("`start_all` takes 0 positional arguments but 1 was given"));
    assert!(found[1]
        .message
        .starts_with("`vlan2.set_loss` is missing its argument `percent`"));
}

#[test]
fn an_undefined_name_gets_the_closest_defined_one() {
    let found = findings("start_all()\nservr.succeed(\"true\")\nmy_nod.succeed(\"true\")\n");
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].line, found[0].column), (4, 1));
    assert_eq!(
        found[0].message,
        "undefined name `servr`; did you mean `server`?"
    );
    // A node's Python name: `my-node` is `my_node`.
    assert_eq!(
        found[1].message,
        "undefined name `my_nod`; did you mean `my_node`?"
    );
    // `machine` exists only when the test has one node.
    let found = findings("machine.succeed(\"true\")\n");
    assert_eq!(found.len(), 1, "{found:?}");
    let one = ScriptNames::new(["solo"], &[1]);
    check_script(
        python(),
        &src("machine.succeed('true')\nsolo.succeed('true')\n", 1),
        &one,
    )
    .unwrap();
}

#[test]
fn unknown_attributes_of_vlans_and_the_driver_globals() {
    let found = findings("vlan1.set_los(10)\nlog.infoo('x')\ndriver.machinez\nvlan3.set_loss(1)\n");
    let messages: Vec<&str> = found.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "VLAN `vlan1` has no attribute `set_los`; did you mean `set_loss`?",
            "`log` has no attribute `infoo`; did you mean `info`?",
            "`driver` has no attribute `machinez`; did you mean `machines`?",
            // `vlan1`, `vlan2` and `vlans` are as close; difflib picks one.
            "undefined name `vlan3`; did you mean `vlans`?",
        ]
    );
}

#[test]
fn dynamic_code_and_rebound_names_are_not_flagged() {
    // Machines from a list, aliases, getattr, names bound in any scope by any means.
    clean(
        "for m in [server, client]:\n    m.succeed('true')\n    m.no_such_method()\n\
         machines[0].whatever()\n\
         getattr(server, 'wait_for_unti')('x')\n\
         import json as j\nfrom os import path\n\
         def helper(x, *args, **kw):\n    global later\n    later = x\n    return undefined_in_body_is_bound_later\n\
         undefined_in_body_is_bound_later = 1\n\
         class K:\n    attr = 1\n\
         with open('/dev/null') as fh:\n    pass\n\
         try:\n    pass\nexcept Exception as err:\n    pass\n\
         [y for y in range(3)]\n\
         (w := 3)\n\
         print(later, j, path, K, fh, helper, len, os.path.join('a'), t.assertEqual, sorted)\n\
         server.succeed(*['a', 'b'])\nserver.wait_for_unit(**{'unit': 'x', 'bogus': 1})\n\
         print(__name__, __file__)\n",
    );
    // A name the script rebinds is the script's: `server` is not the machine any more.
    clean("server = object()\nserver.anything()\n");
    // An attribute the script sets exists.
    clean("server.extra = 1\nprint(server.extra)\n");
    // Whatever a guarded block does.
    clean("try:\n    maybe_defined\nexcept NameError:\n    pass\n");
    clean("try:\n    server.newer_method()\nexcept AttributeError:\n    pass\n");
    // exec, eval, globals() and star imports can bind any global.
    clean("exec('x = 1')\nprint(x)\n");
    clean("globals()['y'] = 1\nprint(y)\n");
    clean("from os.path import *\nprint(join('a', 'b'))\n");
    // The stubs' globals for mypy do not turn the check off.
    let found = findings(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vmrig_globals import *\nservr.succeed('x')\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    // Upstream's compatibility modules.
    clean("from test_driver.errors import RequestedAssertionFailed\n");
}

#[test]
fn a_syntax_error_is_still_a_syntax_error() {
    let err =
        check_script(python(), &src("start_all()\nif x\n    pass\n", 7), &names()).unwrap_err();
    let ScriptError::Syntax(d) = err else {
        panic!("{err}")
    };
    assert_eq!(d.line, Some(8));
}

#[test]
fn a_script_on_the_line_of_its_quotes_is_placed_after_them() {
    // test_script = "servr.succeed('x')": the script starts at column 16.
    let mut s = src("servr.succeed('x')", 2);
    s.first_column = 16;
    let Err(ScriptError::Findings(found)) = check_script(python(), &s, &names()) else {
        panic!("no finding")
    };
    assert_eq!((found.0[0].line, found.0[0].column), (2, 16));
}

#[test]
fn stubs_type_every_method_and_the_tests_machines() {
    let files = stubs(python(), None).unwrap();
    let text = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .unwrap()
    };
    let api = text("vmrig_driver.pyi");
    for line in [
        "class Machine:",
        "    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: Seconds = 900) -> None:",
        "    def succeed(self, *commands: str, timeout: Optional[Seconds] = None) -> str:",
        "    def execute(self, command: str, check_return: bool = True, check_output: bool = True, timeout: Optional[Seconds] = 900) -> Tuple[int, str]:",
        "Seconds = Union[float, datetime.timedelta]",
        "import datetime",
        "def start_all() -> None:",
        "class VLan:",
        "class AssertionTester(unittest.TestCase):",
    ] {
        assert!(api.contains(line), "no {line:?} in:\n{api}");
    }
    let globals = text("vmrig_globals.pyi");
    for line in [
        "from vmrig_driver import start_all as start_all",
        "from vmrig_driver import retry as retry",
        "machines: List[Machine]",
        "vlans: List[VLan]",
        "log: Logger",
        "t: AssertionTester",
        "import os as os",
    ] {
        assert!(globals.contains(line), "no {line:?} in:\n{globals}");
    }
    assert_eq!(globals, text("__builtins__.pyi"));
    assert!(!globals.contains("machine: Machine"), "{globals}");

    let files = stubs(python(), Some(&ScriptNames::new(["my-node"], &[1, 3]))).unwrap();
    let globals = &files[1].1;
    for line in [
        "my_node: Machine",
        "machine: Machine",
        "vlan1: VLan",
        "vlan3: VLan",
    ] {
        assert!(globals.contains(line), "no {line:?} in:\n{globals}");
    }
}

/// The checker runs in the same Python as the scripts: 3.9 or newer.
#[test]
fn the_checker_parses_as_python_3_9() {
    use std::io::Write;
    let check =
        "import ast, sys\nast.parse(sys.stdin.read(), feature_version=(3, 9))\nprint('ok')\n";
    let mut child = std::process::Command::new(python())
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(include_str!("../python/api_tool.py").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
