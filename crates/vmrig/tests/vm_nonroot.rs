//! vmrig as a normal user (issue 19): the suite runs as root, so each test makes an
//! unprivileged user of its own (`useradd`, with subordinate ids), runs a copy of the vmrig
//! binary as that user (`runuser`) from an empty store under its `$XDG_CACHE_HOME`, and
//! removes the user at the end. Not root: the tests fail, saying why (they cannot run).
//! In the nextest `vm` group.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::text;

/// Two nodes of one image (no extra packages: one root image to build).
const PAIR: &str = r#"name = "nonroot-pair"
test_script = '''
start_all()
# The cards get their addresses after udev, before network-online.target (as on NixOS).
beta.wait_for_unit("network-online.target")
alpha.wait_for_unit("network-online.target")
alpha.succeed("ping -c1 -W10 beta")
# The image was made in a user namespace: its files still belong to root and _apt.
owners = alpha.succeed("stat -c %u:%g /etc/passwd /usr/bin/ls /root")
assert owners == "0:0\n0:0\n0:0\n", owners
assert beta.succeed("stat -c %U /var/cache/apt/archives/partial").strip() == "_apt"
# The kernel's modules image too (made from the user's copy of the modules).
mods = alpha.succeed("stat -c %u:%g /lib/modules/$(uname -r)/modules.dep /lib/modules/$(uname -r)/kernel")
assert mods == "0:0\n0:0\n", mods
'''

[nodes.alpha]

[nodes.beta]
"#;

/// A user made for one test, removed (with its home and store) when dropped.
struct TestUser {
    name: String,
    uid: u32,
    home: PathBuf,
    /// A directory the user owns outside its home: the binary, the test file, `TMPDIR`.
    work: tempfile::TempDir,
    vmrig: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    out
}

impl TestUser {
    fn create(tag: &str) -> TestUser {
        assert!(
            is_root(),
            "vm_nonroot needs root: it creates a user (useradd) and runs vmrig as that user \
             with runuser; run it as root (as CI does)"
        );
        let name = format!("vmrig{tag}{}", std::process::id());
        // A home closed to others, as on current Ubuntu (0750) and Fedora (0700): the
        // subordinate ids that mmdebstrap runs as cannot reach the store in it.
        run(Command::new("useradd")
            .args([
                "--create-home",
                "--shell",
                "/bin/bash",
                "-K",
                "HOME_MODE=0700",
            ])
            .arg(&name));
        let mut user = TestUser {
            uid: 0,
            home: PathBuf::new(),
            work: tempfile::Builder::new()
                .prefix("vmrig-nonroot-")
                .tempdir_in("/tmp")
                .unwrap(),
            vmrig: PathBuf::new(),
            name,
        };
        let id = run(Command::new("id").arg("-u").arg(&user.name));
        user.uid = String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
        user.home = PathBuf::from(format!("/home/{}", user.name));
        // useradd gives subordinate ids when login.defs lets it; make sure of them.
        for file in ["/etc/subuid", "/etc/subgid"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if !text
                .lines()
                .any(|l| l.starts_with(&format!("{}:", user.name)))
            {
                run(Command::new("usermod")
                    .args(["--add-subuids", "2000000-2065535"])
                    .args(["--add-subgids", "2000000-2065535"])
                    .arg(&user.name));
            }
        }
        // The test binary's directory (under /root or a 0700 target dir) may be closed to
        // the user: a copy it can read.
        let work = user.work.path().to_owned();
        user.vmrig = work.join("vmrig");
        std::fs::copy(env!("CARGO_BIN_EXE_vmrig"), &user.vmrig).unwrap();
        std::fs::create_dir(work.join("tmp")).unwrap();
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{}:", user.name))
            .arg(&work));
        run(Command::new("chmod").arg("0755").arg(&work));
        user
    }

    fn tmp(&self) -> PathBuf {
        self.work.path().join("tmp")
    }

    fn store(&self) -> PathBuf {
        self.home.join(".cache/vmrig/store")
    }

    /// Writes `text` to `<work>/<name>`, owned by the user.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.work.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::os::unix::fs::chown(&path, Some(self.uid), None).unwrap();
        path
    }

    /// `vmrig ARGS` as the user, in a clean login-like environment.
    fn vmrig(&self, args: &[&str], path: &str) -> Output {
        let mut cmd = Command::new("runuser");
        cmd.arg("-u").arg(&self.name).arg("--").arg("env").arg("-i");
        for (k, v) in [
            ("HOME", self.home.display().to_string()),
            ("USER", self.name.clone()),
            ("LOGNAME", self.name.clone()),
            ("PATH", path.to_owned()),
            (
                "XDG_CACHE_HOME",
                self.home.join(".cache").display().to_string(),
            ),
            ("TMPDIR", self.tmp().display().to_string()),
            ("NO_COLOR", "1".into()),
        ] {
            cmd.arg(format!("{k}={v}"));
        }
        for k in [
            "VMRIG_MIRROR",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
        ] {
            if let Ok(v) = std::env::var(k) {
                cmd.arg(format!("{k}={v}"));
            }
        }
        cmd.arg(&self.vmrig)
            .args(args)
            .current_dir(self.work.path());
        cmd.output().expect("runuser")
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // userdel -r removes the home (and the store in it) and the subordinate ids.
        let _ = Command::new("userdel")
            .args(["--remove", "--force"])
            .arg(&self.name)
            .output();
        // Files of the subordinate ids (none if the builds cleaned up) go with the rest.
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Every file of the store belongs to the user and is readable by them.
fn assert_store_is_the_users(user: &TestUser) {
    let mut stack = vec![user.store()];
    let mut count = 0;
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(
            meta.uid(),
            user.uid,
            "{} belongs to uid {}, not to the user",
            p.display(),
            meta.uid()
        );
        if !meta.file_type().is_symlink() {
            assert!(meta.mode() & 0o400 != 0, "{} is not readable", p.display());
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        count += 1;
    }
    assert!(count > 10, "the store is nearly empty: {count} entries");
    let tmp: Vec<_> = std::fs::read_dir(user.store().join(".tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "build leftovers in .tmp: {tmp:?}");
}

/// From an empty store as a normal user: build and run a two-node test, run it again from
/// its boot snapshots, then as NixOS start scripts under `nixos-driver`.
#[test]
fn a_normal_user_builds_runs_and_restores_snapshots() {
    let user = TestUser::create("nr");
    let spec = user.file("pair.toml", PAIR);
    let spec = spec.to_str().unwrap();
    assert!(!user.store().exists());

    let out = user.vmrig(&["run", "-o", "out1", spec], USER_PATH);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("built kernel"), "{log}");
    assert!(log.contains("built root image for alpha, beta"), "{log}");
    assert!(log.contains("saving a boot snapshot"), "{log}");
    assert_eq!(log.matches("accelerator: ").count(), 1, "{log}");
    assert_store_is_the_users(&user);

    let out = user.vmrig(&["run", "--rerun", "-o", "out2", spec], USER_PATH);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(
        log.matches("restored from the boot snapshot").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("building "), "nothing is built again: {log}");

    // The NixOS interface as the user: start scripts, run by nixos-driver.
    let scripts = user.work.path().join("scripts");
    let out = user.vmrig(
        &["build", "--start-scripts", scripts.to_str().unwrap(), spec],
        USER_PATH,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let script = user.file(
        "test.py",
        "start_all()\nbeta.wait_for_unit('network-online.target')\nalpha.wait_for_unit('network-online.target')\nalpha.succeed('ping -c1 -W10 beta')\nassert alpha.succeed('id -u').strip() == '0'\n",
    );
    // The upstream driver wants its output directory to exist.
    let out3 = user.work.path().join("out3");
    std::fs::create_dir(&out3).unwrap();
    std::os::unix::fs::chown(&out3, Some(user.uid), None).unwrap();
    let run_vm = |node: &str| scripts.join(format!("run-{node}-vm")).display().to_string();
    let out = user.vmrig(
        &[
            "nixos-driver",
            "-o",
            "out3",
            "--start-scripts",
            &run_vm("alpha"),
            &run_vm("beta"),
            "--vlans",
            "1",
            "--",
            script.to_str().unwrap(),
        ],
        USER_PATH,
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("test script finished in"), "{log}");
    assert_store_is_the_users(&user);
    common::assert_no_leftovers(&user.tmp());
    let scratch: Vec<_> = [Path::new("/var/tmp"), Path::new("/tmp"), &user.tmp()]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .filter_map(|e| {
            let e = e.ok()?;
            (e.file_name()
                .to_string_lossy()
                .starts_with("vmrig-scratch-")
                && e.metadata().ok()?.uid() == user.uid)
                .then(|| e.path())
        })
        .collect();
    assert!(scratch.is_empty(), "scratch directories left: {scratch:?}");
}

/// `doctor` and a build when `newuidmap` is not on PATH: each says what is missing and the
/// fix in one line; and a store of one user is refused to another (root included).
#[test]
fn doctor_and_a_build_name_a_missing_newuidmap_and_stores_never_mix() {
    let user = TestUser::create("dr");
    // A PATH of links to every program but newuidmap.
    let bin = user.work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let mut linked = 0;
    for dir in ["/usr/bin", "/bin"] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name();
            if name == "newuidmap" || bin.join(&name).symlink_metadata().is_ok() {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), bin.join(&name)).unwrap();
            linked += 1;
        }
    }
    assert!(linked > 100 && bin.join("newgidmap").exists() && bin.join("sh").exists());
    let path = bin.to_str().unwrap();

    let out = user.vmrig(&["doctor"], path);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(4), "{report}");
    assert!(
        report
            .contains("MISS `newuidmap` is not installed\n     fix: sudo apt-get install uidmap\n"),
        "{report}"
    );
    assert!(!report.contains("`newgidmap` is not installed"), "{report}");
    assert!(
        !report.contains("subordinate ids for"),
        "the user has them: {report}"
    );
    assert!(
        report.ends_with("install them all with: sudo apt-get install uidmap\n"),
        "{report}"
    );
    // With newuidmap back, the same user is ready.
    let out = user.vmrig(&["doctor"], USER_PATH);
    let report = text(&out);
    assert!(
        report.contains(&format!(
            "ok   user namespaces for image builds as {} (newuidmap, newgidmap, subordinate ids)",
            user.name
        )),
        "{report}"
    );

    // A build without newuidmap fails at once, in one line naming the fix (not mmdebstrap's
    // "unable to pick chroot mode automatically").
    let spec = user.file("pair.toml", PAIR);
    let out = user.vmrig(&["build", spec.to_str().unwrap()], path);
    let log = text(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains("image builds as a normal user need user namespaces: `newuidmap` is not installed; fix: sudo apt-get install uidmap"),
        "{log}"
    );
    assert!(!log.contains("chroot mode"), "{log}");
    assert!(!log.contains("mmdebstrap"), "{log}");

    // The user's store (made by the failed build) is refused to root...
    assert!(user.store().is_dir());
    let out = common::command(&user.tmp())
        .args(["store", "list"])
        .env("VMRIG_STORE", user.store())
        .env_remove("VMRIG_STORE_ALLOW_FOREIGN")
        .output()
        .unwrap();
    let log = text(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("belongs to {} (uid {})", user.name, user.uid))
            && log.contains("but vmrig runs as root (uid 0)")
            && log.contains("VMRIG_STORE_ALLOW_FOREIGN=1"),
        "{log}"
    );
    // ...and a root-owned path in it is refused to the user, with the fix.
    let foreign = user
        .store()
        .join("0123456789abcdef0123456789abcdef-made-by-root");
    std::fs::create_dir(&foreign).unwrap();
    let out = user.vmrig(&["store", "list"], USER_PATH);
    let log = text(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("{} belongs to root (uid 0)", foreign.display()))
            && log.contains(&format!("sudo rm -rf {}", foreign.display())),
        "{log}"
    );
    common::assert_no_leftovers(&user.tmp());
}

/// A local .deb as a normal user, from an empty store: the base tarball (mmdebstrap's
/// unshare mode) and the layer that installs the package (a chroot in a user namespace with
/// mmdebstrap's id map); the image's files keep their owners and setuid bits.
#[test]
fn a_normal_user_installs_a_local_deb() {
    let user = TestUser::create("nd");
    let deb = user.work.path().join("hello-daemon.deb");
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(common::repo().join("examples/deb-daemon/hello-daemon"))
        .arg(&deb));
    std::os::unix::fs::chown(&deb, Some(user.uid), None).unwrap();
    let spec = user.file(
        "deb.toml",
        r#"name = "nonroot-deb"
test_script = '''
server.wait_for_unit("hello-daemon.service")
server.wait_for_open_port(7777)
assert server.succeed("nc -w 10 localhost 7777").strip() == "hello from server"
owners = server.succeed("stat -c %u:%g /usr/bin/socat /usr/bin/hello-daemon /etc/passwd")
assert owners == "0:0\n0:0\n0:0\n", owners
assert server.succeed("stat -c %U /var/cache/apt/archives/partial").strip() == "_apt"
assert server.succeed("stat -c %a /usr/bin/su").strip() == "4755"
'''

[nodes.server]
packages = ["./hello-daemon.deb"]
"#,
    );
    let out = user.vmrig(&["run", "-o", "out", spec.to_str().unwrap()], USER_PATH);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("built base tree for server"), "{log}");
    assert!(
        log.contains("built root image for server (local packages)"),
        "{log}"
    );
    assert_store_is_the_users(&user);
    common::assert_no_leftovers(&user.tmp());
}
