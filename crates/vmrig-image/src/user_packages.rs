//! Per-user packages (NixOS `users.users.<name>.packages`) in the root image: a package
//! only users asked for is installed like any other, then its programs are moved off the
//! system PATH into `/opt/vmrig/user-packages/<package>/bin`. The per-node layer puts that
//! directory on those users' PATH only (see `node_layer`).

use crate::node_layer::USER_PACKAGES_DIR;

/// Directories of the system PATH whose programs are moved.
const PATH_DIRS: &[&str] = &[
    "/usr/bin/",
    "/bin/",
    "/usr/sbin/",
    "/sbin/",
    "/usr/games/",
    "/usr/local/bin/",
];

/// A customize-hook fragment (root directory in `$1`) that moves the programs of
/// `packages` out of the PATH.
pub fn relocate_script(packages: &[String]) -> String {
    let mut s = String::new();
    let dirs = PATH_DIRS
        .iter()
        .map(|d| format!("{d}*"))
        .collect::<Vec<_>>()
        .join("|");
    for package in packages {
        let target = format!("{USER_PACKAGES_DIR}/{package}/bin");
        s.push_str(&format!(
            "mkdir -p \"$1{target}\"\nchroot \"$1\" dpkg-query -L '{package}' | while read -r f; do case \"$f\" in {dirs}) if [ -f \"$1$f\" ] || [ -L \"$1$f\" ]; then mv -f \"$1$f\" \"$1{target}/\"; fi;; esac; done\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the fragment against a fake root whose `chroot ... dpkg-query` is a stub.
    #[test]
    fn moves_only_the_packages_programs_off_the_path() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["usr/bin", "usr/share/doc/tree", "bin"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("usr/bin/tree"), "tree").unwrap();
        std::fs::write(r.join("usr/bin/ls"), "ls").unwrap();
        std::fs::write(r.join("usr/share/doc/tree/README"), "doc").unwrap();
        let stub = tempfile::tempdir().unwrap();
        std::fs::write(
            stub.path().join("chroot"),
            "#!/bin/sh\nprintf '/.\\n/usr/bin/tree\\n/usr/share/doc/tree/README\\n/usr/bin/gone\\n'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            stub.path().join("chroot"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let path = format!("{}:/usr/bin:/bin", stub.path().display());
        let status = std::process::Command::new("sh")
            .arg("-ec")
            .arg(relocate_script(&["tree".into()]))
            .arg("sh")
            .arg(r)
            .env("PATH", path)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(!r.join("usr/bin/tree").exists());
        assert!(r.join("opt/vmrig/user-packages/tree/bin/tree").exists());
        assert!(r.join("usr/bin/ls").exists());
        assert!(r.join("usr/share/doc/tree/README").exists());
    }
}
