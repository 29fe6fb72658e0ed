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

/// A local .deb whose Depends: the archive cannot meet: the image build (the layer over the
/// cached base tree) fails with exit 3, naming the place, the node, the package and the
/// dependency, from apt's "Depends: X but it is not installable".
#[test]
fn bad_input_local_deb_with_an_unmet_dependency() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: vmrig-broken\nVersion: 1.0\nArchitecture: all\nMaintainer: vmrig tests <t@example.invalid>\nDepends: vmrig-no-such-package (>= 2)\nDescription: depends on a package no archive has\n",
    )
    .unwrap();
    let built = std::process::Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&pkg)
        .arg(tmp.path().join("broken.deb"))
        .output()
        .expect("run dpkg-deb");
    assert!(built.status.success(), "{}", text(&built));
    let file = tmp.path().join("unmet.toml");
    std::fs::write(
        &file,
        "name = \"unmet\"\ntest_script = \"start_all()\"\n\n[nodes.server]\npackages = [\"./broken.deb\"]\n",
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
    assert_eq!(out.status.code(), Some(3), "{log}");
    let expected = format!(
        "error: {}:5:13: unmet: building the images: local package `vmrig-broken` (of node server) depends on `vmrig-no-such-package (>= 2)`, but it is not installable; check that the package's Depends: can be met from the node's suite (`apt-cache policy <name>`), or add the missing package to `packages`",
        file.display()
    );
    assert!(
        log.lines().any(|l| l == expected),
        "{expected}\nnot in:\n{log}"
    );
    assert_no_leftovers(tmp.path());
}
