//! Host tools the image builders need, checked up front with one message listing what to
//! install.

use std::path::PathBuf;

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct HostTool {
    pub program: &'static str,
    pub package: &'static str,
}

/// What `vmrig build` runs on the host.
pub const BUILD_TOOLS: &[HostTool] = &[
    HostTool {
        program: "mmdebstrap",
        package: "mmdebstrap",
    },
    HostTool {
        program: "mke2fs",
        package: "e2fsprogs",
    },
    HostTool {
        program: "depmod",
        package: "kmod",
    },
];

pub use vmrig_vm::process::find_program;

/// The tools of `tools` that are missing, as `(program, package)`.
pub fn missing(tools: &[HostTool]) -> Vec<HostTool> {
    tools
        .iter()
        .copied()
        .filter(|t| find_program(t.program).is_none())
        .collect()
}

/// One line that names every missing program and the command that installs them all.
pub fn missing_message(missing: &[HostTool]) -> String {
    let programs: Vec<_> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<_> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    format!(
        "missing host tools: {} (install them with: sudo apt-get install {})",
        programs.join(", "),
        packages.join(" ")
    )
}

/// Something that keeps a normal user from building images (user namespaces), with the
/// command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsernsProblem {
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for UsernsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image builds as a normal user need user namespaces: {}; fix: {}",
            self.what, self.fix
        )
    }
}

/// What [`userns_problems_on`] looks at; [`UsernsHost::current`] is this machine.
#[derive(Debug, Clone)]
pub struct UsernsHost {
    pub user: String,
    pub uid: u32,
    /// Where `subuid`, `subgid` are (`/etc`).
    pub etc: PathBuf,
    /// `/proc/sys`.
    pub proc_sys: PathBuf,
    /// Where `newuidmap`/`newgidmap` are looked for (`None`: `PATH` and the sbin dirs).
    pub path: Option<Vec<PathBuf>>,
    /// Try a namespace for real once the files look right.
    pub probe: bool,
}

impl UsernsHost {
    pub fn current() -> UsernsHost {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        UsernsHost {
            user: user_name(uid).unwrap_or_else(|| uid.to_string()),
            uid,
            etc: "/etc".into(),
            proc_sys: "/proc/sys".into(),
            path: None,
            probe: true,
        }
    }

    fn find(&self, program: &str) -> Option<PathBuf> {
        match &self.path {
            None => find_program(program),
            Some(dirs) => vmrig_vm::process::find_program_in(program, dirs.iter().cloned()),
        }
    }
}

/// The login name of `uid` (getpwuid_r).
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: valid buffers; `result` points into `pwd` on success.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_name is a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Why this user cannot build images in user namespaces (empty: nothing known is wrong).
pub fn userns_problems() -> Vec<UsernsProblem> {
    userns_problems_on(&UsernsHost::current())
}

/// mmdebstrap maps 65536 ids (root to nobody).
const SUBID_COUNT: u64 = 65536;

/// [`userns_problems`] on a given host.
pub fn userns_problems_on(host: &UsernsHost) -> Vec<UsernsProblem> {
    let mut out = Vec::new();
    let problem = |what: String, fix: String| UsernsProblem { what, fix };
    for program in ["newuidmap", "newgidmap"] {
        match host.find(program) {
            None => out.push(problem(
                format!("`{program}` is not installed"),
                "sudo apt-get install uidmap".into(),
            )),
            Some(p) if !privileged(&p) => out.push(problem(
                format!(
                    "{} is neither setuid root nor has file capabilities",
                    p.display()
                ),
                format!("sudo chmod u+s {}", p.display()),
            )),
            Some(_) => {}
        }
    }
    let ranges = |file: &str| {
        let text = std::fs::read_to_string(host.etc.join(file)).unwrap_or_default();
        subid_ranges(&text)
    };
    let (subuid, subgid) = (ranges("subuid"), ranges("subgid"));
    let mine = |all: &[(String, u64, u64)]| {
        all.iter()
            .filter(|(owner, _, _)| *owner == host.user || *owner == host.uid.to_string())
            .map(|&(_, _, count)| count)
            .max()
    };
    let (uid_count, gid_count) = (mine(&subuid), mine(&subgid));
    if uid_count.unwrap_or(0) < SUBID_COUNT || gid_count.unwrap_or(0) < SUBID_COUNT {
        // After every range already given out (100000 on a host with none, as useradd).
        let start = match subuid.iter().chain(&subgid).map(|&(_, s, c)| s + c).max() {
            None => 100_000,
            Some(end) => end.max(100_000).div_ceil(SUBID_COUNT) * SUBID_COUNT,
        };
        let range = format!("{start}-{}", start + SUBID_COUNT - 1);
        let files = match (
            uid_count.unwrap_or(0) < SUBID_COUNT,
            gid_count.unwrap_or(0) < SUBID_COUNT,
        ) {
            (true, true) => "/etc/subuid and /etc/subgid have",
            (true, false) => "/etc/subuid has",
            _ => "/etc/subgid has",
        };
        out.push(problem(
            format!(
                "{files} no range of {SUBID_COUNT} subordinate ids for {}",
                host.user
            ),
            format!(
                "sudo usermod --add-subuids {range} --add-subgids {range} {}",
                host.user
            ),
        ));
    }
    let sysctl = |name: &str| {
        std::fs::read_to_string(host.proc_sys.join(name.replace('.', "/")))
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let persist = |setting: &str| {
        format!(
            "sudo sysctl -w {setting} && echo {setting} | sudo tee /etc/sysctl.d/60-vmrig-userns.conf"
        )
    };
    if sysctl("kernel.unprivileged_userns_clone") == Some(0) {
        out.push(problem(
            "the kernel forbids unprivileged user namespaces (kernel.unprivileged_userns_clone = 0)"
                .into(),
            persist("kernel.unprivileged_userns_clone=1"),
        ));
    }
    if sysctl("user.max_user_namespaces") == Some(0) {
        out.push(problem(
            "user namespaces are turned off (user.max_user_namespaces = 0)".into(),
            persist("user.max_user_namespaces=65536"),
        ));
    }
    if sysctl("kernel.apparmor_restrict_unprivileged_userns") == Some(1) {
        out.push(problem(
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)".into(),
            persist("kernel.apparmor_restrict_unprivileged_userns=0"),
        ));
    }
    if out.is_empty() && host.probe {
        if let Some(why) = probe() {
            out.push(problem(
                format!("`unshare --map-auto --setuid 0 --setgid 0 true` failed: {why}"),
                "check the messages above with `vmrig doctor`".into(),
            ));
        }
    }
    out
}

/// Tries a namespace with the subordinate ids, as the builders make them.
fn probe() -> Option<String> {
    let unshare = find_program("unshare")?;
    let output = vmrig_vm::process::command(unshare)
        .args(["--map-auto", "--setuid", "0", "--setgid", "0", "true"])
        .stdin(std::process::Stdio::null())
        .output();
    match output {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("no message")
                .to_owned(),
        ),
        Err(e) => Some(e.to_string()),
    }
}

/// setuid root, or any file capability (`security.capability`).
fn privileged(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.uid() == 0 && meta.mode() & 0o4000 != 0 {
        return true;
    }
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C strings; a null buffer of size 0 asks for the value's size.
    let size = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

/// `(owner, start, count)` of each line of an /etc/subuid-style file.
pub fn subid_ranges(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(':');
            let owner = parts.next()?.to_owned();
            let start = parts.next()?.parse().ok()?;
            let count = parts.next()?.parse().ok()?;
            (!owner.is_empty() && !owner.starts_with('#')).then_some((owner, start, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn userns_host(dir: &std::path::Path) -> UsernsHost {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::create_dir_all(dir.join("sys/user")).unwrap();
        std::fs::create_dir_all(dir.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        UsernsHost {
            user: "alice".into(),
            uid: 1000,
            etc: dir.join("etc"),
            proc_sys: dir.join("sys"),
            path: Some(vec![dir.join("bin")]),
            probe: false,
        }
    }

    #[test]
    fn a_bare_host_names_every_missing_piece_and_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let h = userns_host(dir.path());
        std::fs::write(dir.path().join("etc/subuid"), "bob:100000:65536\n").unwrap();
        std::fs::write(dir.path().join("etc/subgid"), "bob:100000:65536\n").unwrap();
        std::fs::write(
            dir.path().join("sys/kernel/unprivileged_userns_clone"),
            "0\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("sys/user/max_user_namespaces"), "0\n").unwrap();
        std::fs::write(
            dir.path()
                .join("sys/kernel/apparmor_restrict_unprivileged_userns"),
            "1\n",
        )
        .unwrap();
        let p: Vec<String> = userns_problems_on(&h)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(
            p[0].contains("`newuidmap` is not installed; fix: sudo apt-get install uidmap"),
            "{}",
            p[0]
        );
        assert!(p[1].contains("`newgidmap`"), "{}", p[1]);
        assert!(p[2].ends_with("/etc/subuid and /etc/subgid have no range of 65536 subordinate ids for alice; fix: sudo usermod --add-subuids 196608-262143 --add-subgids 196608-262143 alice"), "{}", p[2]);
        assert!(p[3].contains("kernel.unprivileged_userns_clone = 0); fix: sudo sysctl -w kernel.unprivileged_userns_clone=1 && echo"), "{}", p[3]);
        assert!(p[4].contains("user.max_user_namespaces=65536"), "{}", p[4]);
        assert!(
            p[5].contains("AppArmor") && p[5].contains("apparmor_restrict_unprivileged_userns=0"),
            "{}",
            p[5]
        );
        assert!(p[0].starts_with("image builds as a normal user need user namespaces: "));
    }

    #[test]
    fn a_ready_host_has_no_problem_and_a_plain_newuidmap_is_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let h = userns_host(dir.path());
        std::fs::write(dir.path().join("etc/subuid"), "alice:100000:65536\n").unwrap();
        std::fs::write(dir.path().join("etc/subgid"), "1000:100000:65536\n").unwrap();
        std::fs::write(dir.path().join("sys/user/max_user_namespaces"), "1000\n").unwrap();
        for p in ["newuidmap", "newgidmap"] {
            std::os::unix::fs::symlink(format!("/usr/bin/{p}"), dir.path().join("bin").join(p))
                .unwrap();
        }
        if privileged(std::path::Path::new("/usr/bin/newuidmap")) {
            assert_eq!(userns_problems_on(&h), vec![]);
        }
        std::fs::remove_file(dir.path().join("bin/newuidmap")).unwrap();
        std::fs::write(dir.path().join("bin/newuidmap"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("bin/newuidmap"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let p = userns_problems_on(&h);
        assert!(
            p[0].what
                .ends_with("bin/newuidmap is neither setuid root nor has file capabilities"),
            "{p:?}"
        );
        assert!(p[0].fix.starts_with("sudo chmod u+s "), "{p:?}");
    }

    #[test]
    fn subid_lines_parse() {
        assert_eq!(
            subid_ranges("a:100000:65536\n# x\nbad\n1000:5:7\n"),
            vec![("a".into(), 100000, 65536), ("1000".into(), 5, 7)]
        );
    }

    #[test]
    fn message_names_programs_and_packages() {
        let msg = missing_message(&[
            HostTool {
                program: "mmdebstrap",
                package: "mmdebstrap",
            },
            HostTool {
                program: "mke2fs",
                package: "e2fsprogs",
            },
        ]);
        assert_eq!(
            msg,
            "missing host tools: mmdebstrap, mke2fs (install them with: sudo apt-get install mmdebstrap e2fsprogs)"
        );
    }

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(find_program("sh").is_some());
        assert!(find_program("vmrig-no-such-program").is_none());
    }
}
