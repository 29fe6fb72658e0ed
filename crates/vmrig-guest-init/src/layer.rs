//! The per-node layer: copy `/vmrig/layer/**` onto the new root.
//!
//! Directories in the layer follow symlinks already in the target *inside* the
//! new root (Debian's `/lib -> usr/lib` must stay a symlink); files and
//! symlinks replace whatever is at their place (temp file + rename, a symlink
//! there is replaced, never followed). Modes (incl. setuid bits) are kept;
//! ownership is kept when running as root. Existing directories keep their
//! mode and owner.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::sys;

/// Resolves `rel` inside `root` as a chroot would: symlinks are followed,
/// absolute targets start again at `root`, `..` never leaves `root`.
/// Missing components are kept as they are. Returns `root` joined with the
/// resolved relative path.
pub fn resolve_in_root(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    fn comps(p: &Path) -> VecDeque<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    }
    let mut cur = PathBuf::new();
    let mut queue = comps(rel);
    let mut hops = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&c);
        let full = root.join(&cand);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&full)?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut next = comps(&target);
                next.extend(queue);
                queue = next;
            }
            _ => cur = cand,
        }
    }
    Ok(root.join(cur))
}

/// One failure while copying the layer.
#[derive(Debug)]
pub struct LayerError {
    pub path: PathBuf,
    pub what: &'static str,
    pub err: io::Error,
}

/// Copies the tree `src` onto `root`; returns every failure (the copy goes on
/// past failures).
pub fn apply(src: &Path, root: &Path) -> Vec<LayerError> {
    let mut errors = Vec::new();
    copy_dir(src, Path::new(""), root, &mut errors);
    errors
}

fn copy_dir(src_dir: &Path, rel: &Path, root: &Path, errors: &mut Vec<LayerError>) {
    let mut entries: Vec<_> = match fs::read_dir(src_dir) {
        Ok(rd) => rd.filter_map(Result::ok).map(|e| e.file_name()).collect(),
        Err(err) => {
            errors.push(LayerError {
                path: src_dir.to_path_buf(),
                what: "reading layer directory",
                err,
            });
            return;
        }
    };
    entries.sort();
    for name in entries {
        let src = src_dir.join(&name);
        let rel = rel.join(&name);
        let mut fail = |what: &'static str, err: io::Error| {
            errors.push(LayerError {
                path: Path::new("/").join(&rel),
                what,
                err,
            })
        };
        let meta = match fs::symlink_metadata(&src) {
            Ok(m) => m,
            Err(e) => {
                fail("reading layer entry", e);
                continue;
            }
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            match make_dir(root, &rel, &meta) {
                Ok(()) => copy_dir(&src, &rel, root, errors),
                Err(e) => fail("creating directory", e),
            }
        } else if ft.is_file() || ft.is_symlink() {
            if let Err(e) = place(root, &rel, &src, &meta) {
                fail(
                    if ft.is_file() {
                        "writing file"
                    } else {
                        "creating symlink"
                    },
                    e,
                );
            }
        } else {
            fail(
                "unsupported file type (only files, directories, symlinks)",
                io::Error::from_raw_os_error(libc::EINVAL),
            );
        }
    }
}

fn set_owner(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if sys::is_root() {
        sys::lchown(path, meta.uid(), meta.gid())?;
    }
    Ok(())
}

fn make_dir(root: &Path, rel: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let target = resolve_in_root(root, rel)?;
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(&target)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = target.parent() {
        sys::mkdir_p(parent, 0o755)?;
    }
    fs::create_dir(&target)?;
    set_owner(&target, meta)?;
    fs::set_permissions(&target, fs::Permissions::from_mode(meta.mode() & 0o7777))
}

fn place(root: &Path, rel: &Path, src: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = resolve_in_root(root, rel.parent().unwrap_or(Path::new("")))?;
    sys::mkdir_p(&parent, 0o755)?;
    let dest = parent.join(name);
    let mut tmp_name = OsString::from(".vmrig-layer.");
    tmp_name.push(name);
    let tmp = parent.join(tmp_name);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let r = write_tmp(&tmp, src, meta).and_then(|()| {
        if let Ok(m) = fs::symlink_metadata(&dest) {
            if m.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
        }
        fs::rename(&tmp, &dest)
    });
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

fn write_tmp(tmp: &Path, src: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, tmp)?;
        return set_owner(tmp, meta);
    }
    let mut input = fs::File::open(src)?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)?;
    io::copy(&mut input, &mut out)?;
    // Owner first: chown clears setuid bits.
    set_owner(tmp, meta)?;
    out.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "vmrig-init-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(p: &Path, text: &str, mode: u32) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn copies_tree_with_modes_and_symlinks() {
        let src = TempDir::new();
        let root = TempDir::new();
        let (s, r) = (&src.0, &root.0);
        write(&s.join("etc/hostname"), "node1\n", 0o644);
        write(&s.join("usr/local/bin/tool"), "#!/bin/sh\n", 0o755);
        write(&s.join("etc/secret"), "x", 0o600);
        fs::create_dir_all(s.join("srv/empty")).unwrap();
        fs::set_permissions(s.join("srv/empty"), fs::Permissions::from_mode(0o1770)).unwrap();
        symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            s.join("etc/resolv.conf"),
        )
        .unwrap();
        // Existing content in the target.
        write(&r.join("etc/hostname"), "old\n", 0o600);
        write(&r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n", 0o644);

        let errs = apply(s, r);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "node1\n"
        );
        assert_eq!(mode(&r.join("etc/hostname")), 0o644);
        assert_eq!(mode(&r.join("usr/local/bin/tool")), 0o755);
        assert_eq!(mode(&r.join("etc/secret")), 0o600);
        assert_eq!(mode(&r.join("srv/empty")), 0o1770);
        assert_eq!(
            fs::read_link(r.join("etc/resolv.conf")).unwrap(),
            Path::new("/run/systemd/resolve/stub-resolv.conf")
        );
        // Untouched files stay; no temp files are left.
        assert!(r.join("etc/passwd").exists());
        for e in fs::read_dir(r.join("etc")).unwrap() {
            let n = e.unwrap().file_name();
            assert!(!n.to_string_lossy().starts_with(".vmrig-layer."), "{n:?}");
        }
        // Applying twice is fine.
        assert!(apply(s, r).is_empty());
    }

    #[test]
    fn symlink_in_target_is_replaced_not_followed() {
        let src = TempDir::new();
        let root = TempDir::new();
        let outside = TempDir::new();
        let (s, r) = (&src.0, &root.0);
        write(&s.join("etc/motd"), "hello\n", 0o644);
        write(&s.join("etc/issue"), "issue\n", 0o644);
        write(&outside.0.join("victim"), "keep\n", 0o644);
        fs::create_dir_all(r.join("etc")).unwrap();
        symlink(outside.0.join("victim"), r.join("etc/motd")).unwrap();
        symlink("motd", r.join("etc/issue")).unwrap();

        assert!(apply(s, r).is_empty());
        let m = fs::symlink_metadata(r.join("etc/motd")).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(fs::read_to_string(r.join("etc/motd")).unwrap(), "hello\n");
        assert_eq!(fs::read_to_string(r.join("etc/issue")).unwrap(), "issue\n");
        assert_eq!(
            fs::read_to_string(outside.0.join("victim")).unwrap(),
            "keep\n"
        );
    }

    #[test]
    fn directory_symlinks_are_followed_inside_root() {
        let src = TempDir::new();
        let root = TempDir::new();
        let (s, r) = (&src.0, &root.0);
        // Merged /usr: /lib -> usr/lib, and an absolute link /opt -> /usr/opt.
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        fs::create_dir_all(r.join("usr/opt")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink("/usr/opt", r.join("opt")).unwrap();
        write(&s.join("lib/systemd/system/x.service"), "[Unit]\n", 0o644);
        write(&s.join("opt/app/run"), "x", 0o755);
        fs::create_dir_all(s.join("new/dir")).unwrap();

        let errs = apply(s, r);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(fs::symlink_metadata(r.join("lib"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(r.join("usr/lib/systemd/system/x.service").is_file());
        assert!(fs::symlink_metadata(r.join("opt"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(r.join("usr/opt/app/run").is_file());
        assert!(r.join("new/dir").is_dir());
    }

    #[test]
    fn file_over_directory_is_reported() {
        let src = TempDir::new();
        let root = TempDir::new();
        write(&src.0.join("etc/conf"), "x", 0o644);
        write(&src.0.join("etc/ok"), "y", 0o644);
        fs::create_dir_all(root.0.join("etc/conf/sub")).unwrap();
        let errs = apply(&src.0, &root.0);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, Path::new("/etc/conf"));
        assert!(root.0.join("etc/ok").is_file());
    }

    #[test]
    fn resolve_stays_in_root() {
        let root = TempDir::new();
        let r = &root.0;
        fs::create_dir_all(r.join("usr/sbin")).unwrap();
        symlink("usr/sbin", r.join("sbin")).unwrap();
        symlink("/lib/systemd/systemd", r.join("usr/sbin/init")).unwrap();
        symlink("../../../../..", r.join("up")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("/sbin/init")).unwrap(),
            r.join("lib/systemd/systemd")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/up/etc")).unwrap(),
            r.join("etc")
        );
        assert_eq!(resolve_in_root(r, Path::new("")).unwrap(), *r);
        assert!(resolve_in_root(r, Path::new("/loop1/x")).is_err());
    }
}
