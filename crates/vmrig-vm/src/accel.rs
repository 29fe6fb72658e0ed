//! Choosing the accelerator: KVM when `/dev/kvm` can really boot a standard guest, else TCG.
//!
//! Some hosts expose a `/dev/kvm` that cannot boot an ordinary kernel: PVM-based nested
//! setups (`/sys/module/kvm_pvm`) hang after "Probing EDD". We detect those from sysfs
//! instead of paying for a failed boot.

use std::fmt;
use std::path::Path;

/// The accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}` (expected auto, kvm or tcg)"
            )),
        }
    }
}

/// The accelerator and why it was chosen, for the log and `vmrig doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Why KVM was not usable when the user forced it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--accel kvm was requested but KVM is not usable: {0}; run with `--accel auto` (TCG when \
     KVM cannot be used) or `--accel tcg`"
)]
pub struct KvmUnusable(pub String);

/// Decides on this host (`/dev/kvm`, `/sys/module`).
pub fn decide(choice: AccelChoice) -> Result<AccelDecision, KvmUnusable> {
    decide_with(choice, Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// [`decide`] with the paths injectable, for tests.
pub fn decide_with(
    choice: AccelChoice,
    kvm_dev: &Path,
    sys_module: &Path,
) -> Result<AccelDecision, KvmUnusable> {
    let tcg = |reason: String| AccelDecision {
        accel: Accel::Tcg,
        reason,
    };
    match choice {
        AccelChoice::Tcg => Ok(tcg("requested with --accel tcg".into())),
        AccelChoice::Kvm => match kvm_problem(kvm_dev, sys_module) {
            None => Ok(AccelDecision {
                accel: Accel::Kvm,
                reason: "requested with --accel kvm".into(),
            }),
            Some(problem) => Err(KvmUnusable(problem)),
        },
        AccelChoice::Auto => Ok(match kvm_problem(kvm_dev, sys_module) {
            None => AccelDecision {
                accel: Accel::Kvm,
                reason: format!("{} is usable", kvm_dev.display()),
            },
            Some(problem) => tcg(problem),
        }),
    }
}

fn kvm_problem(kvm_dev: &Path, sys_module: &Path) -> Option<String> {
    if !kvm_dev.exists() {
        return Some(format!(
            "{} does not exist (no hardware virtualisation here)",
            kvm_dev.display()
        ));
    }
    if sys_module.join("kvm_pvm").exists() {
        return Some(format!(
            "{} is PVM-based nested virtualisation ({}/kvm_pvm), which cannot boot a standard kernel",
            kvm_dev.display(),
            sys_module.display()
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_dev)
    {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            if let Some(why) = not_in_group(kvm_dev) {
                return Some(why);
            }
        }
        return Some(format!(
            "{} is not accessible ({e}); add yourself to the `kvm` group",
            kvm_dev.display()
        ));
    }
    None
}

/// "not in group kvm" with the command that fixes it, when the device's group is one the
/// process is not in.
fn not_in_group(kvm_dev: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(kvm_dev).ok()?.gid();
    // SAFETY: getegid has no preconditions; getgroups with a buffer of the size it asked.
    let mut groups = vec![unsafe { libc::getegid() }];
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n > 0 {
            let mut more = vec![0 as libc::gid_t; n as usize];
            let n = libc::getgroups(n, more.as_mut_ptr());
            more.truncate(n.max(0) as usize);
            groups.extend(more);
        }
    }
    if groups.contains(&gid) || gid == 0 {
        return None;
    }
    let group = group_name(gid).unwrap_or_else(|| gid.to_string());
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "$USER".into());
    Some(format!(
        "{} is not accessible: not in group {group} (fix: `sudo usermod -aG {group} {user}`, \
         then log in again)",
        kvm_dev.display()
    ))
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed group is a valid out value; valid buffers; `result` points into `grp`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: gr_name is a NUL-terminated string inside `buf`.
    Some(
        unsafe { std::ffi::CStr::from_ptr(grp.gr_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(with_kvm: bool, pvm: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("module")).unwrap();
        if with_kvm {
            std::fs::write(dir.path().join("kvm"), b"").unwrap();
        }
        if pvm {
            std::fs::create_dir(dir.path().join("module/kvm_pvm")).unwrap();
        }
        dir
    }

    fn decide_on(dir: &Path, choice: AccelChoice) -> Result<AccelDecision, KvmUnusable> {
        decide_with(choice, &dir.join("kvm"), &dir.join("module"))
    }

    #[test]
    fn pvm_host_falls_back_to_tcg_and_says_why() {
        let dir = host(true, true);
        let d = decide_on(dir.path(), AccelChoice::Auto).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("PVM"), "{}", d.reason);
        assert!(decide_on(dir.path(), AccelChoice::Kvm)
            .unwrap_err()
            .0
            .contains("PVM"));
    }

    #[test]
    fn usable_kvm_is_chosen_unless_tcg_is_forced() {
        let dir = host(true, false);
        assert_eq!(
            decide_on(dir.path(), AccelChoice::Auto).unwrap().accel,
            Accel::Kvm
        );
        assert_eq!(
            decide_on(dir.path(), AccelChoice::Tcg).unwrap().accel,
            Accel::Tcg
        );
    }

    #[test]
    fn no_kvm_device_means_tcg() {
        let dir = host(false, false);
        let d = decide_on(dir.path(), AccelChoice::Auto).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("does not exist"));
    }

    #[test]
    fn forced_kvm_that_cannot_be_opened_says_why_and_what_to_do() {
        let dir = host(false, false);
        // A directory cannot be opened read-write, not even by root: "not accessible".
        std::fs::create_dir(dir.path().join("kvm")).unwrap();
        let kvm = dir.path().join("kvm");
        let err = decide_on(dir.path(), AccelChoice::Kvm).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--accel kvm was requested but KVM is not usable: {} is not accessible (Is a directory (os error 21)); add yourself to the `kvm` group; run with `--accel auto` (TCG when KVM cannot be used) or `--accel tcg`",
                kvm.display()
            )
        );
        assert_eq!(
            decide_on(dir.path(), AccelChoice::Auto).unwrap().accel,
            Accel::Tcg
        );
    }

    #[test]
    fn a_device_of_a_group_we_are_not_in_says_so_and_the_fix() {
        let dir = host(true, false);
        let kvm = dir.path().join("kvm");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root to give the fake device another group");
            return;
        }
        std::os::unix::fs::chown(&kvm, None, Some(54321)).unwrap();
        let why = not_in_group(&kvm).expect("root is not in group 54321");
        assert!(
            why.contains("is not accessible: not in group 54321 (fix: `sudo usermod -aG 54321 "),
            "{why}"
        );
        std::os::unix::fs::chown(&kvm, None, Some(unsafe { libc::getegid() })).unwrap();
        assert_eq!(not_in_group(&kvm), None);
    }

    #[test]
    fn choice_parses() {
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
