//! Every example of `examples/` (but the graphical ones, see vm_screen.rs) runs and passes
//! under TCG: they are the NixOS examples a user knows, in vmrig's form.

use std::path::Path;
use std::process::Command;

fn run_example(name: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .args(["run", &format!("examples/{name}.toml"), "--rerun", "-o"])
        .arg(tmp.path().join("out"))
        .current_dir(&repo)
        .env("TMPDIR", tmp.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("run vmrig");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains(&format!("test {name} passed")), "{log}");
}

#[test]
fn example_client_server() {
    run_example("client-server");
}

#[test]
fn example_users() {
    run_example("users");
}

#[test]
fn example_router() {
    run_example("router");
}

#[test]
fn example_postgres_api() {
    run_example("postgres-api");
}
