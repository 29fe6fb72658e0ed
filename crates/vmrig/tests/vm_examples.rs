//! Every example of `examples/` (but the graphical ones, see vm_screen.rs) runs and passes
//! under TCG: they are the NixOS examples a user knows, in vmrig's form.

mod common;

fn run_example(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = common::command(tmp.path())
        .args(["run", &format!("examples/{name}.toml"), "--rerun", "-o"])
        .arg(tmp.path().join("out"))
        .output()
        .expect("run vmrig");
    let log = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains(&format!("test {name} passed")), "{log}");
    common::assert_no_leftovers(tmp.path());
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

/// The user's own program: built by cargo here, as the example's comment says, then tested.
#[test]
fn example_own_program() {
    common::build_example_artifacts();
    run_example("own-program");
}

#[test]
fn example_shared_folder() {
    run_example("shared-folder");
    // The script removes what it wrote: the folder holds only its own files again.
    let mut left: Vec<_> = std::fs::read_dir(common::repo().join("examples/shared-folder"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".gitignore", "README"]);
}

/// The package is built first, as the example's comment says (the output is gitignored);
/// reproducibly, so an unchanged source is the same file and every image stays cached.
#[test]
fn example_deb_daemon() {
    common::build_example_artifacts();
    run_example("deb-daemon");
}
