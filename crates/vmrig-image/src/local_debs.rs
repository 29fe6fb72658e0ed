//! Root images with local package files (`packages = ["./foo.deb"]`): a base tree plus a
//! layer, so that a rebuilt package does not rebuild the base system.
//!
//! - `<h>-rootfs-base-<suite>` holds `root.tar`: what mmdebstrap makes of the node's archive
//!   packages and vmrig's guest bits (no `setup`, no local packages), with apt's package
//!   lists kept. Its key leaves the local packages out: a changed `.deb` finds it cached.
//! - `<h>-rootfs-<suite>-debs` holds `root.img`: the base tree unpacked, the local packages
//!   installed with `apt-get install ./x.deb` in a chroot of it (their dependencies from the
//!   archive, with the sources the base was built with), then the `setup` commands and the
//!   end of the usual customize hook, then `mke2fs -d`. Its key is the base's, the packages'
//!   SHA-256s and that script.
//!
//! Unpacking a tarball keeps what `debugfs rdump` of a `root.img` would lose (setuid bits,
//! hard links, extended attributes), and costs about as much (under a second). The chroot
//! runs in its own mount (and, as a normal user, user and PID) namespace, so its `/proc` and
//! `/dev` mounts go with it; as a normal user with mmdebstrap's id map
//! ([`crate::run::as_mapped_root_with_mounts`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use vmrig_spec::{ImageInputs, LocalDeb};
use vmrig_store::{StoreKey, StorePath};
use vmrig_vm::backdoor::shell_quote;

use crate::rootfs::{self, Output};
use crate::run::{is_root, run_tool, Scratch};
use crate::{ImageBuilder, ImageError, BUILDER_VERSION};

/// The device nodes mmdebstrap puts into a tarball's `/dev` (`$devtar` in mmdebstrap).
const DEV_NODES: &[&str] = &[
    "console", "full", "null", "ptmx", "random", "tty", "urandom", "zero",
];

/// Where the layer script puts the packages inside the tree while it installs them.
const DEBS_IN_ROOT: &str = "/tmp/vmrig-debs";

/// Builds or finds the root image of `inputs` (which have local packages) for `nodes`.
pub fn build(
    b: &ImageBuilder,
    inputs: &ImageInputs,
    kernel: &StorePath,
    nodes: &[String],
) -> Result<StorePath, ImageError> {
    let names = nodes.join(", ");
    let base_inputs = base_inputs(inputs);
    let base_script = rootfs::base_script();
    let base_key = base_key(inputs, kernel);
    let mirror = b.mirror_for(inputs);
    let base_step = format!("base tree for {names}");
    let base = b.cached_step(&base_step, &base_key, |out| {
        rootfs::bootstrap(
            b,
            &base_step,
            &base_inputs,
            mirror.as_deref(),
            &base_script,
            Output::Tarball,
            out,
        )
        .map_err(|e| rootfs::unknown_package(e, nodes))
    })?;
    let script = layer_script(inputs);
    let key = layer_key(&base_key, inputs, &script);
    let step = format!("root image for {names} (local packages)");
    b.cached_step(&step, &key, |out| {
        layer(b, &step, &inputs.local_debs, &base, &script, out)
            .map_err(|e| unmet_dependency(e, nodes))
    })
}

/// The store key of the root image of `inputs` over `kernel`.
pub fn key(inputs: &ImageInputs, kernel: &StorePath) -> Result<StoreKey, ImageError> {
    Ok(layer_key(
        &base_key(inputs, kernel),
        inputs,
        &layer_script(inputs),
    ))
}

/// What the base tree is made of: the suite, mirror and archive packages only (the user
/// packages are moved off the PATH and `setup` runs in the layer, after the local packages).
fn base_inputs(inputs: &ImageInputs) -> ImageInputs {
    ImageInputs {
        suite: inputs.suite.clone(),
        mirror: inputs.mirror.clone(),
        packages: inputs.packages.clone(),
        ..Default::default()
    }
}

fn base_key(inputs: &ImageInputs, kernel: &StorePath) -> StoreKey {
    rootfs::tree_key(
        "rootfs-base",
        &base_inputs(inputs),
        kernel,
        &rootfs::base_script(),
    )
}

fn layer_key(base: &StoreKey, inputs: &ImageInputs, script: &str) -> StoreKey {
    let script_hash = hex::encode(Sha256::digest(script.as_bytes()));
    let hashes: Vec<&str> = inputs
        .local_debs
        .iter()
        .map(|d| d.sha256.as_str())
        .collect();
    let material = format!(
        "{BUILDER_VERSION}\nrootfs-debs\n{}\n{}\n{script_hash}",
        base.base_name(),
        hashes.join(",")
    );
    StoreKey::new(
        &format!("rootfs-{}-debs", inputs.suite),
        material.as_bytes(),
    )
}

/// A package's name inside the tree: by its content, so renaming the file changes nothing.
fn name_in_root(deb: &LocalDeb) -> String {
    format!("{}.deb", &deb.sha256[..16])
}

/// The layer's script: `$1` the root directory to make, `$2` the base tarball, `$3` the
/// directory holding the packages (named by [`name_in_root`]).
pub(crate) fn layer_script(inputs: &ImageInputs) -> String {
    let debs: Vec<String> = inputs
        .local_debs
        .iter()
        .map(|d| shell_quote(&format!("{DEBS_IN_ROOT}/{}", name_in_root(d))))
        .collect();
    let mut s = String::from(concat!(
        "set -eu\n",
        // chroot and dpkg's helpers (ldconfig, start-stop-daemon) are in sbin, which a
        // normal user's PATH may lack; the chroot's commands get the same PATH.
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        "r=$1\n",
        "mkdir \"$1\"\n",
    ));
    // mmdebstrap's tarballs hold the device nodes of /dev, which its directory output (so a
    // plain root image) has not, and which root of a user namespace may not make: left out.
    let devices: String = DEV_NODES
        .iter()
        .map(|d| format!(" --exclude=./dev/{d}"))
        .collect();
    s.push_str(&format!(
        "tar --numeric-owner --xattrs --xattrs-include='*'{devices} -xpf \"$2\" -C \"$1\"\n"
    ));
    s.push_str(&format!(
        "mkdir -p \"$1{DEBS_IN_ROOT}\"\ncp \"$3\"/*.deb \"$1{DEBS_IN_ROOT}/\"\n"
    ));
    // A chroot that maintainer scripts can run in and apt can download from; nothing may
    // start a service (policy-rc.d), and the tree's own resolv.conf comes back after.
    s.push_str(concat!(
        // In a user namespace the mounts under the /dev bind are locked to it: only a lazy
        // unmount of the whole tree works there.
        "unmount() { umount -R \"$r/dev\" \"$r/proc\" 2>/dev/null || umount -l \"$r/dev\" \"$r/proc\" 2>/dev/null || true; }\n",
        "trap unmount EXIT\n",
        "mount -t proc proc \"$1/proc\" 2>/dev/null || mount --rbind /proc \"$1/proc\"\n",
        "mount --rbind /dev \"$1/dev\"\n",
        "if [ -e \"$1/etc/resolv.conf\" ] || [ -L \"$1/etc/resolv.conf\" ]; then mv \"$1/etc/resolv.conf\" \"$1/etc/resolv.conf.vmrig\"; fi\n",
        "if [ -e /etc/resolv.conf ]; then cp -L /etc/resolv.conf \"$1/etc/resolv.conf\"; fi\n",
        "printf '#!/bin/sh\\nexit 101\\n' > \"$1/usr/sbin/policy-rc.d\"\n",
        "chmod 755 \"$1/usr/sbin/policy-rc.d\"\n",
        "export DEBIAN_FRONTEND=noninteractive\n",
    ));
    // The base's lists are as old as the base: when the archive has moved on (a point
    // release removed a version), fetch them again and retry once.
    s.push_str(&format!(
        concat!(
            "install() {{ chroot \"$r\" apt-get install -y --no-install-recommends -o Dpkg::Use-Pty=0 {}; }}\n",
            "if ! install; then\n",
            "  echo 'vmrig: updating the package lists and trying again'\n",
            "  chroot \"$1\" apt-get update\n",
            "  install\n",
            "fi\n",
        ),
        debs.join(" ")
    ));
    s.push_str(&rootfs::setup_script(&inputs.setup));
    s.push_str(&rootfs::finish_script(inputs));
    s.push_str(&format!(
        concat!(
            "rm -rf \"$1{}\" \"$1/usr/sbin/policy-rc.d\" \"$1/etc/resolv.conf\"\n",
            "if [ -e \"$1/etc/resolv.conf.vmrig\" ] || [ -L \"$1/etc/resolv.conf.vmrig\" ]; then mv \"$1/etc/resolv.conf.vmrig\" \"$1/etc/resolv.conf\"; fi\n",
            "unmount\n",
            // mke2fs must not copy the host's /dev or /proc into the image.
            "if mountpoint -q \"$1/dev\" || mountpoint -q \"$1/proc\"; then echo \"vmrig: cannot unmount $1/dev or $1/proc\" >&2; exit 1; fi\n",
        ),
        DEBS_IN_ROOT
    ));
    s
}

fn layer(
    b: &ImageBuilder,
    step: &str,
    debs: &[LocalDeb],
    base: &StorePath,
    script: &str,
    out: &Path,
) -> Result<(), ImageError> {
    let scratch = (!is_root()).then(|| Scratch::new(out)).transpose()?;
    let work = scratch.as_ref().map_or(out, |s| s.path());
    let debs_dir = work.join("debs");
    std::fs::create_dir(&debs_dir).map_err(ImageError::io("creating the packages directory"))?;
    for deb in debs {
        copy_deb(deb, &debs_dir.join(name_in_root(deb)))?;
    }
    // The namespace's root (a subordinate id, as a normal user) makes the tree: in a
    // directory it may write, next to a copy of the base it can read (the store may be in
    // a home that other users cannot search).
    let ns_dir = work.join("ns");
    std::fs::create_dir(&ns_dir).map_err(ImageError::io("creating the layer directory"))?;
    let tarball = if is_root() {
        base.path().join("root.tar")
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ns_dir, std::fs::Permissions::from_mode(0o777))
            .map_err(ImageError::io("opening the layer directory"))?;
        let copy = work.join("base.tar");
        std::fs::hard_link(base.path().join("root.tar"), &copy)
            .or_else(|_| std::fs::copy(base.path().join("root.tar"), &copy).map(|_| ()))
            .map_err(ImageError::io("copying the base tree"))?;
        copy
    };
    let root = ns_dir.join("root");
    let sh = PathBuf::from("sh");
    let mut cmd = if is_root() {
        Command::new(&sh)
    } else {
        crate::run::as_mapped_root_with_mounts(&sh)
    };
    cmd.arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&root)
        .arg(&tarball)
        .arg(&debs_dir);
    run_tool(&mut cmd, step, b.observer)?;

    let image = rootfs::make_image(b, step, &root, work)?;
    if scratch.is_some() {
        rootfs::publish(&image, &out.join("root.img"))?;
    } else {
        for dir in [&ns_dir, &debs_dir] {
            std::fs::remove_dir_all(dir)
                .map_err(ImageError::io(format!("removing {}", dir.display())))?;
        }
    }
    Ok(())
}

/// Copies `deb` to `to`, checking that it is still what the test file was read with.
fn copy_deb(deb: &LocalDeb, to: &Path) -> Result<(), ImageError> {
    std::fs::copy(&deb.path, to).map_err(ImageError::io(format!(
        "copying the local package {}",
        deb.path.display()
    )))?;
    let now = vmrig_spec::check_deb(to).ok();
    if now.as_deref() != Some(deb.sha256.as_str()) {
        return Err(ImageError::LocalDebChanged {
            path: deb.path.clone(),
        });
    }
    Ok(())
}

/// Maps apt's "X : Depends: Y but it is not installable" to an error naming the package, the
/// dependency and the nodes.
fn unmet_dependency(err: ImageError, nodes: &[String]) -> ImageError {
    if let ImageError::Tool { lines, .. } = &err {
        if let Some((package, dependency, reason)) = lines.iter().find_map(|l| unmet_in(l)) {
            return ImageError::UnmetDependency {
                package,
                dependency,
                reason,
                nodes: nodes.to_vec(),
            };
        }
    }
    err
}

/// `(package, dependency, reason)` from one line of apt's list of unmet dependencies:
/// ` hello-daemon : Depends: nosuch (>= 1) but it is not installable`.
pub fn unmet_in(line: &str) -> Option<(String, String, String)> {
    let (package, rest) = line.trim().split_once(" : ")?;
    let rest = rest
        .strip_prefix("Depends: ")
        .or_else(|| rest.strip_prefix("PreDepends: "))
        .or_else(|| rest.strip_prefix("Pre-Depends: "))?;
    let (dependency, reason) = match rest.split_once(" but ") {
        Some((dep, why)) => (dep, format!("but {why}")),
        None => (rest, "which cannot be installed".to_string()),
    };
    let package = package.trim();
    (!package.is_empty() && !package.contains(' '))
        .then(|| (package.to_string(), dependency.trim().to_string(), reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deb(sha: char) -> LocalDeb {
        LocalDeb {
            written: "./x.deb".into(),
            path: "/nowhere/x.deb".into(),
            sha256: sha.to_string().repeat(64),
        }
    }

    #[test]
    fn reads_apts_unmet_dependencies() {
        assert_eq!(
            unmet_in(" hello-daemon : Depends: nosuchpkg but it is not installable"),
            Some((
                "hello-daemon".into(),
                "nosuchpkg".into(),
                "but it is not installable".into()
            ))
        );
        assert_eq!(
            unmet_in(" x : Depends: libfoo (>= 9) but 1.2-1 is to be installed").map(|u| u.1),
            Some("libfoo (>= 9)".into())
        );
        assert_eq!(unmet_in("E: Unable to correct problems"), None);
        assert_eq!(unmet_in("Get:1 http://x trixie InRelease"), None);
    }

    #[test]
    fn a_new_package_changes_only_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = vmrig_store::Store::open(dir.path()).unwrap();
        let kernel = store
            .build(&StoreKey::new("kernel-trixie", b"k"), |out| {
                std::fs::write(out.join("version"), "6.12-test")
            })
            .unwrap();
        let with = |d: LocalDeb, setup: &[&str]| ImageInputs {
            suite: "trixie".into(),
            packages: vec!["curl".into()],
            setup: setup.iter().map(|s| s.to_string()).collect(),
            local_debs: vec![d],
            ..Default::default()
        };
        let (a, b) = (with(deb('a'), &[]), with(deb('b'), &[]));
        assert_eq!(base_key(&a, &kernel), base_key(&b, &kernel));
        assert_ne!(key(&a, &kernel).unwrap(), key(&b, &kernel).unwrap());
        // setup runs in the layer: the base stays.
        let c = with(deb('a'), &["touch /x"]);
        assert_eq!(base_key(&a, &kernel), base_key(&c, &kernel));
        assert_ne!(key(&a, &kernel).unwrap(), key(&c, &kernel).unwrap());
        assert_eq!(key(&a, &kernel).unwrap().name(), "rootfs-trixie-debs");
        // Where the file is does not matter, only what it holds.
        let mut moved = deb('a');
        moved.written = "../elsewhere/y.deb".into();
        moved.path = "/elsewhere/y.deb".into();
        assert_eq!(
            key(&a, &kernel).unwrap(),
            key(&with(moved, &[]), &kernel).unwrap()
        );
        // Without local packages, the plain root image's key: unchanged by this module.
        let plain = ImageInputs {
            local_debs: vec![],
            ..a.clone()
        };
        assert_eq!(
            rootfs::key(&plain, &kernel).unwrap().name(),
            "rootfs-trixie"
        );
    }

    #[test]
    fn the_layer_installs_every_package_by_its_content_name() {
        let inputs = ImageInputs {
            suite: "trixie".into(),
            local_debs: vec![deb('a'), deb('b')],
            setup: vec!["echo hi".into()],
            ..Default::default()
        };
        let s = layer_script(&inputs);
        let install = s.find("apt-get install").unwrap();
        assert!(
            s.contains(
                "'/tmp/vmrig-debs/aaaaaaaaaaaaaaaa.deb' '/tmp/vmrig-debs/bbbbbbbbbbbbbbbb.deb'"
            ),
            "{s}"
        );
        assert!(s.find("/bin/sh -ec 'echo hi'").unwrap() > install);
        assert!(s.find("var/lib/apt/lists").unwrap() > install);
    }
}
