//! The root filesystem store path: `root.img`, an ext4 image made by
//! `mmdebstrap --variant=minbase` (packages), a customize hook (vmrig's guest bits, the
//! node's `setup` commands) and `mke2fs -d`.
//!
//! As root mmdebstrap runs in its root mode; otherwise in `--mode=unshare`, and `mke2fs`
//! runs in a matching user namespace so file ownership comes out right.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use vmrig_spec::ImageInputs;
use vmrig_store::{StoreKey, StorePath};

use crate::run::{is_root, run_tool};
use crate::{guest_bits, tools, ImageBuilder, ImageError, BUILDER_VERSION};

/// Packages every guest gets: systemd as init, and what the driver runs in the guest.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "bash",
    "coreutils",
    "util-linux",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "procps",
    "kmod",
    "nftables",
];

/// Builds or finds the root image for `inputs` (shared by `nodes`, named in errors).
/// Inputs with local package files are a base tree plus a layer (`local_debs`).
pub fn build(
    b: &ImageBuilder,
    inputs: &ImageInputs,
    kernel: &StorePath,
    nodes: &[String],
) -> Result<StorePath, ImageError> {
    if !inputs.local_debs.is_empty() {
        return crate::local_debs::build(b, inputs, kernel, nodes);
    }
    let (key, script) = key_and_script(inputs, kernel)?;
    let step = format!("root image for {}", nodes.join(", "));
    let mirror = b.mirror_for(inputs);
    b.cached_step(&step, &key, |out| {
        bootstrap(
            b,
            &step,
            inputs,
            mirror.as_deref(),
            &script,
            Output::Image,
            out,
        )
        .map_err(|e| unknown_package(e, nodes))
    })
}

/// The store key of the root image for `inputs` over `kernel`.
pub fn key(inputs: &ImageInputs, kernel: &StorePath) -> Result<StoreKey, ImageError> {
    if !inputs.local_debs.is_empty() {
        return crate::local_debs::key(inputs, kernel);
    }
    key_and_script(inputs, kernel).map(|(key, _)| key)
}

fn key_and_script(
    inputs: &ImageInputs,
    kernel: &StorePath,
) -> Result<(StoreKey, String), ImageError> {
    let script = customize_script(inputs);
    Ok((tree_key("rootfs", inputs, kernel, &script), script))
}

/// The key of what mmdebstrap makes of `inputs` with the customize hook `script`, named
/// `<kind>-<suite>`. The root image holds no kernel modules (VMs mount the kernel's modules
/// image), but it is made for one kernel: the key names it by its store name, not by where
/// the store is, so a moved store (or another VMRIG_STORE spelling) finds its images again.
pub(crate) fn tree_key(
    kind: &str,
    inputs: &ImageInputs,
    kernel: &StorePath,
    script: &str,
) -> StoreKey {
    let script_hash = hex::encode(Sha256::digest(script.as_bytes()));
    let material = format!(
        "{BUILDER_VERSION}\n{kind}\n{}\n{}\n{script_hash}\n{}",
        inputs.canonical_json(),
        kernel.base_name(),
        BASE_PACKAGES.join(",")
    );
    StoreKey::new(&format!("{kind}-{}", inputs.suite), material.as_bytes())
}

/// What a bootstrap leaves in the store path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// `root.img`, the bootable ext4 image.
    Image,
    /// `root.tar`, the tree as mmdebstrap wrote it (owners, modes, links, extended
    /// attributes) with apt's package lists kept: the base that local packages are
    /// installed on (`local_debs`).
    Tarball,
}

pub(crate) fn bootstrap(
    b: &ImageBuilder,
    step: &str,
    inputs: &ImageInputs,
    mirror: Option<&str>,
    script: &str,
    output: Output,
    out: &Path,
) -> Result<(), ImageError> {
    // As a normal user mmdebstrap (unshare mode) works where its namespace can reach.
    let scratch = (!is_root())
        .then(|| crate::run::Scratch::new(out))
        .transpose()?;
    let work = scratch.as_ref().map_or(out, |s| s.path());
    let hook = work.join("customize.sh");
    std::fs::write(&hook, script).map_err(ImageError::io("writing the customize hook"))?;
    let target = work.join(match output {
        Output::Image => "root",
        Output::Tarball => "root.tar",
    });
    let mut include: Vec<&str> = BASE_PACKAGES.to_vec();
    include.extend(inputs.packages.iter().map(String::as_str));

    let mut cmd = Command::new("mmdebstrap");
    cmd.env("TMPDIR", work)
        .arg("--variant=minbase")
        .arg(if is_root() {
            "--mode=root"
        } else {
            "--mode=unshare"
        })
        .arg(format!("--include={}", include.join(",")))
        .arg(format!("--customize-hook=sh {} \"$1\"", hook.display()));
    if output == Output::Tarball {
        // apt-get install of a local package needs them; the layer removes them.
        cmd.arg("--skip=cleanup/apt/lists");
    }
    cmd.arg(&inputs.suite).arg(&target);
    cmd.args(mirror);
    run_tool(&mut cmd, step, b.observer)?;

    match output {
        Output::Image => {
            let image = make_image(b, step, &target, work)?;
            if scratch.is_some() {
                publish(&image, &out.join("root.img"))?;
            } else {
                std::fs::remove_dir_all(&target)
                    .map_err(ImageError::io("removing the root tree"))?;
            }
        }
        // mmdebstrap writes the tarball as the caller, in either mode.
        Output::Tarball if scratch.is_some() => publish(&target, &out.join("root.tar"))?,
        Output::Tarball => {}
    }
    if scratch.is_none() {
        std::fs::remove_file(&hook).map_err(ImageError::io("removing the customize hook"))?;
    }
    // A scratch tree belongs to subordinate ids: removed through a namespace when dropped.
    Ok(())
}

/// `root.img` in `work`, an ext4 image of the tree `root` (read with its real owners).
pub(crate) fn make_image(
    b: &ImageBuilder,
    step: &str,
    root: &Path,
    work: &Path,
) -> Result<std::path::PathBuf, ImageError> {
    let image = work.join("root.img");
    if !is_root() {
        // The namespace's root is a subordinate id: it writes into a file the caller made.
        use std::os::unix::fs::PermissionsExt;
        std::fs::File::create(&image)
            .and_then(|_| std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)))
            .map_err(ImageError::io("creating root.img"))?;
    }
    let mke2fs = tools::find_program("mke2fs").unwrap_or_else(|| "mke2fs".into());
    let size_mib = crate::modules_image::dir_size(root) / (1024 * 1024) * 5 / 4 + 1024;
    let mut mkfs = in_namespace(&mke2fs);
    mkfs.args(["-q", "-F", "-t", "ext4", "-L", "vmrig-root", "-m", "0"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg("-d")
        .arg(root)
        .arg(&image)
        .arg(format!("{size_mib}M"));
    run_tool(&mut mkfs, step, b.observer)?;
    Ok(image)
}

/// Moves a file made in a scratch directory into the store path, readable by all.
pub(crate) fn publish(from: &Path, to: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    crate::run::move_path(from, to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).map_err(ImageError::io(
        format!("setting the mode of {}", to.display()),
    ))
}

/// A command that sees the tree mmdebstrap left with its real owners: as a normal user,
/// root of a user namespace with mmdebstrap's id map (the first subordinate range from 0).
pub(crate) fn in_namespace(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        crate::run::as_mapped_root(program)
    }
}

/// The customize hook: guest bits, setup commands, apt cleanup. (No kernel modules: every
/// VM mounts its kernel's modules image, `modules_image.rs`.)
pub fn customize_script(inputs: &ImageInputs) -> String {
    let mut s = base_script();
    s.push_str(&setup_script(&inputs.setup));
    s.push_str(&finish_script(inputs));
    s
}

/// The first part of the customize hook (root directory in `$1`): the guest bits. It is
/// all of a base tree's hook (`local_debs`), whose layer runs the rest.
pub(crate) fn base_script() -> String {
    let mut s = String::from("set -eu\n");
    s.push_str(&guest_bits::install_script());
    s
}

/// The `setup` commands, in order, each in its own chrooted shell.
pub(crate) fn setup_script(setup: &[String]) -> String {
    let mut s = String::new();
    for cmd in setup {
        s.push_str(&format!(
            "echo \"vmrig: setup: \"{q}\nDEBIAN_FRONTEND=noninteractive chroot \"$1\" /bin/sh -ec {q}\n",
            q = sh_quote(cmd)
        ));
    }
    s
}

/// The end of every root tree's hook, after the `setup` commands: user packages off the
/// PATH, apt's lists and caches out, and boot-time cuts that depend on the installed
/// packages.
pub(crate) fn finish_script(inputs: &ImageInputs) -> String {
    let mut s = crate::user_packages::relocate_script(&inputs.user_only_packages);
    s.push_str("rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin \"$1\"/var/cache/apt/archives/*.deb\n");
    // Boot-time cuts that depend on the installed packages (see guest_bits for the rest):
    // - Debian's /etc/modules-load.d/modules.conf is a link to /etc/modules, which lists no
    //   module; without it systemd-modules-load.service (a process) only runs when a package
    //   or the test puts a list into a modules-load.d directory.
    // - /etc/.updated and /var/.updated as new as /usr: the image is complete, so the
    //   ConditionNeedsUpdate= units (systemd-sysusers, journal catalog) have nothing to do at
    //   boot; the packages' users were made when they were installed.
    s.push_str(concat!(
        "if [ \"$(readlink \"$1/etc/modules-load.d/modules.conf\" 2>/dev/null)\" = ../modules ] && ! grep -q '^[^#]' \"$1/etc/modules\" 2>/dev/null; then rm -f \"$1/etc/modules-load.d/modules.conf\"; fi\n",
        "touch -r \"$1/usr\" \"$1/etc/.updated\" \"$1/var/.updated\"\n",
    ));
    s
}

use vmrig_vm::backdoor::shell_quote as sh_quote;

/// Maps apt's "unable to locate package" to an error naming the package and the nodes.
pub(crate) fn unknown_package(err: ImageError, nodes: &[String]) -> ImageError {
    if let ImageError::Tool { lines, .. } = &err {
        for line in lines {
            if let Some(package) = unknown_package_in(line) {
                return ImageError::UnknownPackage {
                    package,
                    nodes: nodes.to_vec(),
                };
            }
        }
    }
    err
}

/// The package apt could not find, from one line of its output.
pub fn unknown_package_in(line: &str) -> Option<String> {
    let rest = line
        .split_once("Unable to locate package ")
        .map(|(_, r)| r)
        .or_else(|| {
            line.split_once("Package '")
                .map(|(_, r)| r)
                .filter(|r| r.contains("has no installation candidate"))
        })?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "+-.:".contains(*c))
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unknown_package_in_apt_output() {
        assert_eq!(
            unknown_package_in("E: Unable to locate package nosuchpkg").as_deref(),
            Some("nosuchpkg")
        );
        assert_eq!(
            unknown_package_in("E: Package 'foo' has no installation candidate").as_deref(),
            Some("foo")
        );
        assert_eq!(unknown_package_in("I: running apt-get update..."), None);
    }

    #[test]
    fn the_key_does_not_depend_on_where_the_store_is() {
        let inputs = ImageInputs {
            suite: "bookworm".into(),
            packages: vec!["less".into()],
            ..Default::default()
        };
        let key_in = |dir: &Path| {
            let store = vmrig_store::Store::open(dir).unwrap();
            let kernel = store
                .build(&StoreKey::new("kernel-bookworm", b"k"), |out| {
                    std::fs::write(out.join("version"), "6.1.0-test")
                })
                .unwrap();
            key(&inputs, &kernel).unwrap()
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        assert_eq!(
            key_in(&a.path().join("store")),
            key_in(&b.path().join("elsewhere/store"))
        );
    }

    #[test]
    fn customize_script_runs_setup_commands_quoted_in_order() {
        let inputs = ImageInputs {
            suite: "bookworm".into(),
            mirror: None,
            packages: vec![],
            setup: vec!["echo 'a b' > /x".into(), "touch /y".into()],
            ..Default::default()
        };
        let s = customize_script(&inputs);
        let a = s.find(r#"/bin/sh -ec 'echo '\''a b'\'' > /x'"#).expect(&s);
        let b = s.find("/bin/sh -ec 'touch /y'").unwrap();
        assert!(a < b);
        assert!(s.starts_with("set -eu\n"));
    }
}
