//! Early API mounts, waiting for the root device, mounting the root.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmdline::{Cmdline, RootSpec};
use crate::{log, sys, Fatal};

/// Where the read-only root and the tmpfs upper live when `ro` is given.
pub const RO_LOWER: &str = "/vmrig/ro";
pub const RW_UPPER: &str = "/vmrig/rw";

/// Mounts devtmpfs, proc and sysfs, then points fds 0-2 at `/dev/console`.
pub fn early_mounts() -> Result<(), Fatal> {
    let hint = "the kernel needs CONFIG_DEVTMPFS, proc and sysfs";
    for (fs_type, dir) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        let dir = Path::new(dir);
        sys::mkdir_p(dir, 0o755)
            .map_err(|e| Fatal::new(format!("creating {}", dir.display()), e, hint))?;
        let flags = libc::MS_NOSUID
            | if fs_type == "devtmpfs" {
                0
            } else {
                libc::MS_NOEXEC | libc::MS_NODEV
            };
        match sys::mount(fs_type, dir, Some(fs_type), flags, None) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                return Err(Fatal::new(
                    format!("mounting {fs_type} on {}", dir.display()),
                    e,
                    hint,
                ))
            }
        }
        if fs_type == "devtmpfs" {
            reopen_console();
        }
    }
    Ok(())
}

fn reopen_console() {
    // SAFETY: plain fd syscalls on a path we own.
    unsafe {
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..3 {
            if fd != target {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// Reads the ext2/3/4
/// identity (UUID, label) from a superblock (the 1024 bytes at offset 1024).
pub fn ext_ident(sb: &[u8]) -> Option<(String, String)> {
    if sb.len() < 0x88 || u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let u = &sb[0x68..0x78];
    let hex =
        |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    );
    let l = &sb[0x78..0x88];
    let end = l.iter().position(|&b| b == 0).unwrap_or(l.len());
    Some((uuid, String::from_utf8_lossy(&l[..end]).into_owned()))
}

fn read_superblock(dev: &Path) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    let mut buf = vec![0u8; 1024];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn block_names() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/class/block")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn is_block(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

fn find_root(spec: &RootSpec) -> Option<PathBuf> {
    match spec {
        RootSpec::Path(p) => is_block(Path::new(p)).then(|| PathBuf::from(p)),
        RootSpec::Label(want) | RootSpec::Uuid(want) => block_names().into_iter().find_map(|n| {
            let dev = Path::new("/dev").join(n);
            let (uuid, label) = ext_ident(&read_superblock(&dev)?)?;
            let got = if matches!(spec, RootSpec::Label(_)) {
                label
            } else {
                uuid
            };
            (&got == want).then_some(dev)
        }),
    }
}

/// Polls every 5 ms until the root device exists, at most `timeout`.
pub fn wait_for_root(root: &str, timeout: Duration) -> Result<PathBuf, Fatal> {
    wait_for_device(root, "root", timeout)
}

/// Waits (at most `timeout`) for the disk `spec` (`vmrig.modules=`) and mounts it
/// read-only on `/lib/modules/<running kernel>` of `newroot` (under `/usr` when `/lib`
/// is a link, as on merged-/usr systems).
pub fn mount_modules(spec: &str, newroot: &Path, timeout: Duration) -> Result<(), Fatal> {
    let dev = wait_for_device(spec, "modules", timeout)?;
    let release = sys::kernel_release()
        .map_err(|e| Fatal::new("reading the kernel release (uname)".into(), e, ""))?;
    let target = modules_dir(newroot, &release);
    sys::mkdir_p(&target, 0o755)
        .map_err(|e| Fatal::new(format!("creating {}", target.display()), e, ""))?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(&dev.to_string_lossy(), &target, Some("ext4"), flags, None).map_err(|e| {
        Fatal::new(
            format!(
                "mounting the modules disk {} on {}",
                dev.display(),
                target.display()
            ),
            e,
            "the modules image is an ext4 file system (modules.img in the kernel's store path)",
        )
    })?;
    log::step(&format!(
        "mounted the modules disk {} on {}",
        dev.display(),
        target.display()
    ));
    Ok(())
}

/// `<newroot>/lib/modules/<release>`, or `<newroot>/usr/lib/modules/<release>` when `lib`
/// is a symbolic link (it is resolved inside the new root, not in the initramfs).
pub fn modules_dir(newroot: &Path, release: &str) -> PathBuf {
    let lib = newroot.join("lib");
    let base = if lib
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        newroot.join("usr/lib")
    } else {
        lib
    };
    base.join("modules").join(release)
}

fn wait_for_device(root: &str, what: &str, timeout: Duration) -> Result<PathBuf, Fatal> {
    let fix = format!(
        "fix {}= on the kernel command line",
        if what == "root" {
            "root"
        } else {
            "vmrig.modules"
        }
    );
    let spec = RootSpec::parse(root).map_err(|m| Fatal::msg(m, &fix))?;
    let start = Instant::now();
    loop {
        if let Some(dev) = find_root(&spec) {
            log::step(&format!(
                "{what} device {} appeared after {} ms",
                dev.display(),
                start.elapsed().as_millis()
            ));
            return Ok(dev);
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let names = block_names();
    let present = if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(" ")
    };
    Err(Fatal::msg(
        format!(
            "{what} device {root} did not appear within {} s; /sys/class/block: {present}",
            timeout.as_secs()
        ),
        "is the disk attached to the VM, and are virtio_pci and virtio_blk in /etc/vmrig/modules?",
    ))
}

fn fs_hint(fstype: &str) -> String {
    let known = fs::read_to_string("/proc/filesystems")
        .map(|t| t.split_whitespace().any(|w| w == fstype))
        .unwrap_or(true);
    if known {
        format!("is the device really {fstype}? see the kernel messages above (rootflags=?)")
    } else {
        format!("the kernel does not know {fstype}: add its module (and deps such as crc32c) to /etc/vmrig/modules")
    }
}

fn mount_fs(dev: &Path, target: &Path, cfg: &Cmdline, flags: libc::c_ulong) -> Result<(), Fatal> {
    let devs = dev.to_string_lossy();
    let mut last = None;
    for t in cfg.rootfstype.split(',').filter(|t| !t.is_empty()) {
        match sys::mount(&devs, target, Some(t), flags, cfg.rootflags.as_deref()) {
            Ok(()) => {
                log::step(&format!("mounted {devs} ({t}) on {}", target.display()));
                return Ok(());
            }
            Err(e) => last = Some((t, e)),
        }
    }
    let (t, e) = last.unwrap_or(("(none)", io::Error::from_raw_os_error(libc::EINVAL)));
    Err(Fatal::new(
        format!("mounting root {devs} as {t} on {}", target.display()),
        e,
        &fs_hint(t),
    ))
}

/// Mounts the root on `newroot`: read-write, or with `ro` read-only under an
/// overlay whose upper layer is a tmpfs.
pub fn mount_root(dev: &Path, cfg: &Cmdline, newroot: &Path) -> Result<(), Fatal> {
    sys::mkdir_p(newroot, 0o755)
        .map_err(|e| Fatal::new(format!("creating {}", newroot.display()), e, ""))?;
    if !cfg.ro {
        return mount_fs(dev, newroot, cfg, 0);
    }
    let (lower, rw) = (Path::new(RO_LOWER), Path::new(RW_UPPER));
    for d in [lower, rw] {
        sys::mkdir_p(d, 0o755)
            .map_err(|e| Fatal::new(format!("creating {}", d.display()), e, ""))?;
    }
    mount_fs(dev, lower, cfg, libc::MS_RDONLY)?;
    sys::mount("tmpfs", rw, Some("tmpfs"), 0, Some("mode=0755"))
        .map_err(|e| Fatal::new("mounting the tmpfs for the overlay".into(), e, ""))?;
    for d in ["upper", "work"] {
        let d = rw.join(d);
        sys::mkdir_p(&d, 0o755)
            .map_err(|e| Fatal::new(format!("creating {}", d.display()), e, ""))?;
    }
    let data = format!("lowerdir={RO_LOWER},upperdir={RW_UPPER}/upper,workdir={RW_UPPER}/work");
    sys::mount("overlay", newroot, Some("overlay"), 0, Some(&data)).map_err(|e| {
        Fatal::new(
            format!("mounting the overlay root on {}", newroot.display()),
            e,
            &fs_hint("overlay"),
        )
    })?;
    log::step("mounted overlay root (read-only lower, tmpfs upper)");
    Ok(())
}

/// Moves /dev, /proc and /sys under the new root.
pub fn move_api_mounts(newroot: &Path) -> Result<(), Fatal> {
    for d in ["/dev", "/proc", "/sys"] {
        let target = newroot.join(&d[1..]);
        sys::mkdir_p(&target, 0o755)
            .map_err(|e| Fatal::new(format!("creating {}", target.display()), e, ""))?;
        sys::mount(d, &target, None, libc::MS_MOVE, None)
            .map_err(|e| Fatal::new(format!("moving {d} to {}", target.display()), e, ""))?;
    }
    log::step("moved /dev /proc /sys into the new root");
    Ok(())
}

/// The API file systems that systemd mounts through mount units, each with a `mount`
/// process (50-200 ms under TCG): `(type, target, flags, directory that must exist)`.
/// Mounted here with one system call each, with the units' options; systemd finds them
/// mounted and the units (dev-hugepages.mount, ...) active.
const SYSTEMD_API_MOUNTS: &[(&str, &str, libc::c_ulong, &str)] = &[
    ("hugetlbfs", "dev/hugepages", 0, "sys/kernel/mm/hugepages"),
    (
        "mqueue",
        "dev/mqueue",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "proc/sys/fs/mqueue",
    ),
    (
        "debugfs",
        "sys/kernel/debug",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "sys/kernel/debug",
    ),
    (
        "tracefs",
        "sys/kernel/tracing",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "sys/kernel/tracing",
    ),
];

/// Mounts [`SYSTEMD_API_MOUNTS`] under `newroot` (after [`move_api_mounts`]). Best
/// effort: what fails here, systemd mounts itself.
pub fn systemd_api_mounts(newroot: &Path) {
    for &(fs_type, target, flags, needs) in SYSTEMD_API_MOUNTS {
        if !newroot.join(needs).exists() {
            continue;
        }
        let dir = newroot.join(target);
        let r = sys::mkdir_p(&dir, 0o755)
            .and_then(|()| sys::mount(fs_type, &dir, Some(fs_type), flags, None));
        match r {
            Ok(()) => log::step(&format!("mounted {fs_type} on /{target}")),
            Err(e) => log::step(&format!(
                "mounting {fs_type} on /{target}: {} (left to systemd)",
                log::errno_text(&e)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dir_follows_a_merged_usr_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            modules_dir(dir.path(), "6.1.0-1"),
            dir.path().join("lib/modules/6.1.0-1")
        );
        std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).unwrap();
        assert_eq!(
            modules_dir(dir.path(), "6.12.0-1"),
            dir.path().join("usr/lib/modules/6.12.0-1")
        );
    }

    #[test]
    fn ext_superblock_identity() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(ext_ident(&sb), None);
        sb[0x38] = 0x53;
        sb[0x39] = 0xEF;
        for (i, b) in sb[0x68..0x78].iter_mut().enumerate() {
            *b = 0xa0 + i as u8;
        }
        sb[0x78..0x7d].copy_from_slice(b"rootx");
        let (uuid, label) = ext_ident(&sb).unwrap();
        assert_eq!(uuid, "a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf");
        assert_eq!(label, "rootx");
    }
}
