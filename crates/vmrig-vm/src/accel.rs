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
        return Some(format!(
            "{} is not accessible ({e}); add yourself to the `kvm` group",
            kvm_dev.display()
        ));
    }
    None
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
    fn choice_parses() {
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
    }
}
