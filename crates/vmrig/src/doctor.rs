//! `vmrig doctor`: is this host ready to build images and run tests? Each missing thing
//! comes with the `apt-get install` that fixes it; exit 0 when everything required is
//! there, 4 otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::exit;
use crate::units::format_bytes;

/// QEMU 7.2 brought `-netdev stream`, which vmrig's switch needs.
const MIN_QEMU: (u32, u32) = (7, 2);
/// Below this much free space in the store, warn (a root image is 0.5-1.5 GiB).
const LOW_DISK_BYTES: u64 = 4 << 30;

/// What the checks look at; [`Host::current`] is this machine, tests make fake ones.
pub struct Host {
    /// Directories searched for programs, in order.
    pub path: Vec<PathBuf>,
    pub qemu: PathBuf,
    pub python: PathBuf,
    pub store_dir: Option<PathBuf>,
    pub firmware: Option<PathBuf>,
    pub root: bool,
    /// What image builds as a normal user need (`None` as root: root mode needs none).
    pub userns: Option<vmrig_image::tools::UsernsHost>,
}

impl Host {
    pub fn current(qemu: PathBuf, python: PathBuf) -> Host {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from)); // as the image builders do
                                                                // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let userns = (!root).then(|| {
            let mut h = vmrig_image::tools::UsernsHost::current();
            h.path = Some(dirs.clone());
            h
        });
        Host {
            path: dirs,
            qemu,
            python,
            store_dir: vmrig_store::default_store_dir().ok(),
            firmware: vmrig_driver::driver::firmware(),
            root,
            userns,
        }
    }

    fn find(&self, program: &Path) -> Option<PathBuf> {
        vmrig_vm::process::find_program_in(program, self.path.iter().cloned())
    }

    fn install(&self, packages: &[&str]) -> String {
        let sudo = if self.root { "" } else { "sudo " };
        format!("{sudo}apt-get install {}", packages.join(" "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Required and missing or broken.
    Missing,
    /// Optional, or a warning.
    Warn,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub text: String,
    /// Packages that fix it.
    pub fix: Vec<&'static str>,
    /// A command that fixes it, when that is not a package.
    pub fix_command: Option<String>,
}

fn check(level: Level, text: impl Into<String>, fix: &[&'static str]) -> Check {
    Check {
        level,
        text: text.into(),
        fix: fix.to_vec(),
        fix_command: None,
    }
}

/// Every check, in the order shown.
pub fn checks(host: &Host) -> Vec<Check> {
    let mut out = vec![qemu(host)];
    out.push(program(
        host,
        "qemu-img",
        &["qemu-utils"],
        true,
        "VM disk overlays",
    ));
    out.push(accelerator());
    out.push(match &host.firmware {
        Some(f) => check(Level::Ok, format!("qboot firmware {}", f.display()), &[]),
        None => check(
            Level::Warn,
            "qboot firmware not found (optional: boots about 1.7 s faster than SeaBIOS)",
            &["qemu-system-data"],
        ),
    });
    // The image builders' own list of host tools.
    for tool in vmrig_image::tools::BUILD_TOOLS {
        out.push(program(
            host,
            tool.program,
            &[tool.package],
            true,
            "image builds",
        ));
    }
    if !host.root {
        out.push(program(
            host,
            "unshare",
            &["util-linux"],
            true,
            "image builds without root",
        ));
    }
    out.extend(userns(host));
    out.push(python(host));
    out.push(program(
        host,
        "tesseract",
        &["tesseract-ocr"],
        false,
        "OCR of screenshots",
    ));
    out.push(disk(host));
    out
}

/// As a normal user: newuidmap/newgidmap, subordinate ids, user namespaces allowed.
fn userns(host: &Host) -> Vec<Check> {
    let Some(u) = &host.userns else {
        return vec![check(
            Level::Info,
            "image builds run as root (mmdebstrap's root mode): no user namespaces needed",
            &[],
        )];
    };
    let problems = vmrig_image::tools::userns_problems_on(u);
    if problems.is_empty() {
        return vec![check(
            Level::Ok,
            format!(
                "user namespaces for image builds as {} (newuidmap, newgidmap, subordinate ids)",
                u.user
            ),
            &[],
        )];
    }
    problems
        .into_iter()
        .map(|p| {
            if p.fix == "sudo apt-get install uidmap" {
                check(Level::Missing, p.what, &["uidmap"])
            } else {
                Check {
                    level: Level::Missing,
                    text: p.what,
                    fix: vec![],
                    fix_command: Some(p.fix),
                }
            }
        })
        .collect()
}

fn program(host: &Host, name: &str, fix: &[&'static str], required: bool, what: &str) -> Check {
    match host.find(Path::new(name)) {
        Some(p) => check(Level::Ok, format!("{name} ({})", p.display()), &[]),
        None if required => check(
            Level::Missing,
            format!("{name} not found (needed for {what})"),
            fix,
        ),
        None => check(
            Level::Warn,
            format!("{name} not found (optional: {what})"),
            fix,
        ),
    }
}

fn qemu(host: &Host) -> Check {
    let fix = &["qemu-system-x86", "qemu-utils"];
    let name = host.qemu.display();
    let Some(path) = host.find(&host.qemu) else {
        return check(Level::Missing, format!("{name} not found"), fix);
    };
    let output = Command::new(&path).arg("--version").output();
    let text = output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    match qemu_version(&text) {
        Some(v) if v >= MIN_QEMU => check(
            Level::Ok,
            format!("{name} {}.{} ({})", v.0, v.1, path.display()),
            &[],
        ),
        Some(v) => check(
            Level::Missing,
            format!(
                "{name} is QEMU {}.{}; vmrig needs {}.{} or newer (for -netdev stream)",
                v.0, v.1, MIN_QEMU.0, MIN_QEMU.1
            ),
            fix,
        ),
        None => check(
            Level::Missing,
            format!(
                "{name} --version did not say which QEMU it is: {:?}",
                text.trim()
            ),
            fix,
        ),
    }
}

/// `(major, minor)` from `QEMU emulator version 7.2.22 (Debian ...)`.
/// QEMU's `major.minor` from `qemu --version` (the driver's parser: one place).
pub fn qemu_version(text: &str) -> Option<(u32, u32)> {
    vmrig_driver::run::parse_qemu_version(text)
}

fn accelerator() -> Check {
    use vmrig_vm::accel::{decide, AccelChoice};
    match decide(AccelChoice::Auto) {
        Ok(d) => check(
            Level::Info,
            format!("accelerator: {} ({})", d.accel, d.reason),
            &[],
        ),
        Err(e) => check(Level::Info, format!("accelerator: {e}"), &[]),
    }
}

fn python(host: &Host) -> Check {
    let fix = &["python3"];
    let Some(path) = host.find(&host.python) else {
        return check(
            Level::Missing,
            format!(
                "{} not found (runs the test scripts)",
                host.python.display()
            ),
            fix,
        );
    };
    match vmrig_python::probe_python(&path) {
        Ok(v) => check(Level::Ok, format!("python {v} ({})", path.display()), &[]),
        Err(e) => check(Level::Missing, e.to_string(), fix),
    }
}

fn disk(host: &Host) -> Check {
    let Some(dir) = &host.store_dir else {
        return check(
            Level::Warn,
            "no store directory (set VMRIG_STORE or HOME)",
            &[],
        );
    };
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match vmrig_store::free_bytes(existing) {
        Some(free) if free < LOW_DISK_BYTES => check(
            Level::Warn,
            format!(
                "store {}: only {} free (images take 0.5-1.5 GiB each; `vmrig store gc` frees space)",
                dir.display(),
                format_bytes(free)
            ),
            &[],
        ),
        Some(free) => check(
            Level::Ok,
            format!("store {}: {} free", dir.display(), format_bytes(free)),
            &[],
        ),
        None => check(Level::Warn, format!("store {}: free space unknown", dir.display()), &[]),
    }
}

/// The report and the exit code.
pub fn report(host: &Host, checks: &[Check]) -> (String, i32) {
    let mut out = String::new();
    let mut packages: Vec<&str> = Vec::new();
    let mut other_fixes = false;
    for c in checks {
        let mark = match c.level {
            Level::Ok => "ok  ",
            Level::Missing => "MISS",
            Level::Warn => "warn",
            Level::Info => "info",
        };
        out.push_str(&format!("{mark} {}\n", c.text));
        if let Some(command) = &c.fix_command {
            out.push_str(&format!("     fix: {command}\n"));
            if c.level == Level::Missing {
                other_fixes = true;
            }
        }
        if !c.fix.is_empty() {
            out.push_str(&format!("     fix: {}\n", host.install(&c.fix)));
            if c.level == Level::Missing {
                for p in &c.fix {
                    if !packages.contains(p) {
                        packages.push(p);
                    }
                }
            }
        }
    }
    if packages.is_empty() && !other_fixes {
        out.push_str("everything vmrig needs is here\n");
        (out, exit::OK)
    } else if packages.is_empty() {
        out.push_str("not ready: run the fixes above\n");
        (out, exit::INFRA)
    } else {
        if other_fixes {
            out.push_str("not ready: run the fixes above; ");
        }
        out.push_str(&format!(
            "missing required tools; install them all with: {}\n",
            host.install(&packages)
        ));
        (out, exit::INFRA)
    }
}

pub fn run(qemu: PathBuf, python: PathBuf) -> anyhow::Result<i32> {
    let host = Host::current(qemu, python);
    let (text, code) = report(&host, &checks(&host));
    print!("{text}");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake(dir: &Path, name: &str, script: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn host(dir: &Path, root: bool) -> Host {
        Host {
            path: vec![dir.to_owned()],
            qemu: "qemu-system-x86_64".into(),
            python: "python3".into(),
            store_dir: Some(dir.join("store")),
            firmware: None,
            root,
            userns: (!root).then(|| {
                std::fs::create_dir_all(dir.join("etc")).unwrap();
                vmrig_image::tools::UsernsHost {
                    user: "alice".into(),
                    uid: 1000,
                    etc: dir.join("etc"),
                    proc_sys: dir.join("sys"),
                    path: Some(vec![dir.to_owned()]),
                    probe: false,
                }
            }),
        }
    }

    #[test]
    fn versions_of_qemu() {
        assert_eq!(
            qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright"),
            Some((7, 2))
        );
        assert_eq!(
            qemu_version("QEMU emulator version 10.0.0\n"),
            Some((10, 0))
        );
        assert_eq!(qemu_version("nonsense"), None);
    }

    #[test]
    fn an_empty_path_lists_every_fix_and_fails() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(dir.path(), false);
        let (text, code) = report(&h, &checks(&h));
        assert_eq!(code, exit::INFRA);
        assert!(text.contains("MISS qemu-system-x86_64 not found\n     fix: sudo apt-get install qemu-system-x86 qemu-utils\n"), "{text}");
        assert!(text.contains("MISS mmdebstrap not found (needed for image builds)\n     fix: sudo apt-get install mmdebstrap\n"), "{text}");
        assert!(text.contains("warn tesseract not found (optional: OCR of screenshots)\n     fix: sudo apt-get install tesseract-ocr\n"), "{text}");
        assert!(text.contains("MISS python3 not found"), "{text}");
        assert!(text.ends_with(
            "install them all with: sudo apt-get install qemu-system-x86 qemu-utils mmdebstrap e2fsprogs kmod util-linux uidmap python3\n"
        ), "{text}");
    }

    #[test]
    fn old_qemu_and_python_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            "qemu-system-x86_64",
            "echo 'QEMU emulator version 6.2.0 (Debian)'",
        );
        fake(dir.path(), "python3", "echo 3.8");
        let h = host(dir.path(), true);
        let (text, code) = report(&h, &checks(&h));
        assert_eq!(code, exit::INFRA);
        assert!(text.contains("MISS qemu-system-x86_64 is QEMU 6.2; vmrig needs 7.2 or newer (for -netdev stream)\n     fix: apt-get install qemu-system-x86 qemu-utils\n"), "{text}");
        assert!(text.contains("3.8") && text.contains("3.9"), "{text}");
        assert!(!text.contains("unshare"), "root needs no unshare: {text}");
    }

    #[test]
    fn a_user_without_namespaces_gets_each_fix() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(dir.path(), false);
        std::fs::create_dir_all(dir.path().join("sys/user")).unwrap();
        std::fs::write(dir.path().join("sys/user/max_user_namespaces"), "0\n").unwrap();
        let (text, code) = report(&h, &checks(&h));
        assert_eq!(code, exit::INFRA);
        assert!(
            text.contains(
                "MISS `newuidmap` is not installed\n     fix: sudo apt-get install uidmap\n"
            ),
            "{text}"
        );
        assert!(text.contains("MISS /etc/subuid and /etc/subgid have no range of 65536 subordinate ids for alice\n     fix: sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 alice\n"), "{text}");
        assert!(text.contains("MISS user namespaces are turned off (user.max_user_namespaces = 0)\n     fix: sudo sysctl -w user.max_user_namespaces=65536"), "{text}");
        assert!(
            text.contains("not ready: run the fixes above; missing required tools"),
            "{text}"
        );
    }

    #[test]
    fn a_complete_host_passes_with_optional_warnings() {
        let dir = tempfile::tempdir().unwrap();
        fake(
            dir.path(),
            "qemu-system-x86_64",
            "echo 'QEMU emulator version 8.2.2'",
        );
        fake(dir.path(), "python3", "echo 3.11");
        for p in [
            "qemu-img",
            "mmdebstrap",
            "mke2fs",
            "depmod",
            "unshare",
            "newuidmap",
            "newgidmap",
        ] {
            fake(dir.path(), p, "true");
        }
        let mut h = host(dir.path(), false);
        std::fs::write(dir.path().join("etc/subuid"), "alice:100000:65536\n").unwrap();
        std::fs::write(dir.path().join("etc/subgid"), "alice:100000:65536\n").unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root owns the fakes: setuid root, as the real ones.
            for p in ["newuidmap", "newgidmap"] {
                let p = dir.path().join(p);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
            }
        } else {
            h.userns = None; // a user cannot make setuid-root fakes
        }
        let (text, code) = report(&h, &checks(&h));
        assert_eq!(code, exit::OK, "{text}");
        if h.userns.is_some() {
            assert!(
                text.contains("ok   user namespaces for image builds as alice"),
                "{text}"
            );
        }
        assert!(text.contains("ok   qemu-system-x86_64 8.2 ("), "{text}");
        assert!(text.contains("ok   python 3.11"), "{text}");
        assert!(text.contains("info accelerator: "), "{text}");
        assert!(text.contains("warn qboot firmware not found"), "{text}");
        assert!(text.ends_with("everything vmrig needs is here\n"), "{text}");
    }
}
