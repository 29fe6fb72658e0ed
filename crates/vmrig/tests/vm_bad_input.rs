//! Bad input that only shows once a VM runs: a test script that raises (an undefined name
//! would not get this far: `vmrig check` runs first). In the nextest `vm`
//! group; the node is examples/single.toml's, so the image is shared with the other VM tests.
//! The rest of the bad-input classes need no VM: see bad_input.rs and docs/bad-input.md.

mod common;
use common::{assert_no_leftovers, text};

use common::vmrig_rerun as vmrig;

#[test]
fn bad_input_script_that_raises_names_the_toml_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("raises.toml");
    std::fs::write(
        &file,
        "name = \"raises\"\ntest_script = '''\nmachine.succeed(\"true\")\nanswer = int(\"forty-two\")\nprint(\"not reached\")\n'''\n\n[nodes.machine]\npackages = [\"less\"]\n",
    )
    .unwrap();
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "-o",
            tmp.path().join("out").to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    // The traceback points into the TOML file, at the script's line 2 (the file's line 4).
    assert!(
        log.contains(&format!(
            "  File \"{}\", line 4, in <module>",
            file.display()
        )),
        "{log}"
    );
    assert!(log.contains("    answer = int(\"forty-two\")"), "{log}");
    let summary = log
        .lines()
        .find(|l| l.starts_with("test raises FAILED after "))
        .unwrap_or_else(|| panic!("no summary line in:\n{log}"));
    assert!(
        summary.ends_with(&format!(
            " s: {}:4: ValueError: invalid literal for int() with base 10: 'forty-two'",
            file.display()
        )),
        "{summary}"
    );
    assert!(!log.contains("not reached"), "{log}");
    assert_no_leftovers(tmp.path());
}
