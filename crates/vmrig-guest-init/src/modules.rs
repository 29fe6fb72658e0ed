//! `/etc/vmrig/modules`: the module load order, and loading with `finit_module`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use crate::log;

/// One line of the load order: `<path-in-initramfs> [module params...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Absolute path inside the initramfs.
    pub path: String,
    /// Parameters as one space-separated string (as `finit_module` wants them).
    pub params: String,
    /// 1-based line number in the list, for messages.
    pub line: usize,
}

/// Parses the load order; blank lines and `#` comments are skipped, relative
/// paths are taken from `/`.
pub fn parse_load_order(text: &str) -> Vec<ModuleEntry> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut words = l.split_whitespace();
        let Some(path) = words.next() else { continue };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let params = words.collect::<Vec<_>>().join(" ");
        out.push(ModuleEntry {
            path,
            params,
            line: i + 1,
        });
    }
    out
}

/// The compression suffix of a module the kernel cannot take as is.
pub fn compressed_suffix(path: &str) -> Option<&'static str> {
    [".ko.xz", ".ko.zst", ".ko.gz"]
        .into_iter()
        .find(|s| path.ends_with(s))
}

fn finit_module(path: &str, params: &str) -> io::Result<()> {
    let file = File::open(path)?;
    let params = crate::sys::cstr(params)?;
    // SAFETY: valid fd and C string; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn hint_for(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "file missing from the initramfs, or an unknown symbol: a dependency is missing or listed after it (see kernel messages above)"
        }
        Some(libc::ENOEXEC) => {
            "not a valid module for this kernel (built for another kernel version? compressed?)"
        }
        Some(libc::EINVAL) => "bad module parameters or version magic mismatch (see kernel messages above)",
        Some(libc::ENOKEY | libc::EKEYREJECTED) => "module signature rejected by the kernel",
        _ => "see the kernel messages above",
    }
}

/// Modules of the list that booting does not need: the 9p file system (for shares mounted
/// later, when the root file system's modprobe loads it on demand) and overlay, which the
/// boot needs only for a read-only root (`ro`). Each costs 10-30 ms under TCG.
pub const DEFERRED: &[&str] = &["9p", "9pnet", "9pnet_virtio", "netfs", "fscache"];

/// The module name of a module file: `/lib/modules/kernel/fs/9p/9p.ko` -> `9p`
/// (dashes read as underscores, as the kernel does).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Whether the boot loads `name` (see [`DEFERRED`]).
pub fn needed_for_boot(name: &str, ro: bool) -> bool {
    if name == "overlay" {
        return ro;
    }
    !DEFERRED.contains(&name)
}

/// Loads every module of the list in order for which `wanted(module name)` holds;
/// returns the number of failures.
/// A missing list is not an error (everything may be built in).
pub fn load_all(list: &Path, wanted: impl Fn(&str) -> bool) -> usize {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::step(&format!(
                "no {} in the initramfs: loading no modules",
                list.display()
            ));
            return 0;
        }
        Err(e) => {
            log::error(&format!("reading {}", list.display()), Some(&e));
            return 1;
        }
    };
    let mut failures = 0;
    for m in parse_load_order(&text) {
        if !wanted(&module_name(&m.path)) {
            log::step(&format!("skipped {} (not needed to boot)", m.path));
            continue;
        }
        if let Some(suffix) = compressed_suffix(&m.path) {
            log::error(
                &format!("module {} is compressed ({suffix}); not loaded", m.path),
                None,
            );
            log::hint("the initramfs builder must decompress modules at build time");
            failures += 1;
            continue;
        }
        let t = Instant::now();
        match finit_module(&m.path, &m.params) {
            Ok(()) => log::step(&format!(
                "loaded {} ({} ms)",
                m.path,
                t.elapsed().as_millis()
            )),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                log::step(&format!("{} already loaded or built in", m.path))
            }
            Err(e) => {
                log::error(
                    &format!("loading module {} ({}:{})", m.path, list.display(), m.line),
                    Some(&e),
                );
                log::hint(hint_for(&e));
                failures += 1;
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_order_params_and_comments() {
        let text = "# load order\n\
                    /lib/modules/virtio_ring.ko\n\
                    \n\
                    lib/modules/virtio_blk.ko   queue_depth=64  foo=\"a\"\n  \
                    /lib/modules/ext4.ko\t\n";
        let v = parse_load_order(text);
        assert_eq!(
            v,
            vec![
                ModuleEntry {
                    path: "/lib/modules/virtio_ring.ko".into(),
                    params: String::new(),
                    line: 2
                },
                ModuleEntry {
                    path: "/lib/modules/virtio_blk.ko".into(),
                    params: "queue_depth=64 foo=\"a\"".into(),
                    line: 4
                },
                ModuleEntry {
                    path: "/lib/modules/ext4.ko".into(),
                    params: String::new(),
                    line: 5
                },
            ]
        );
        assert!(parse_load_order("").is_empty());
    }

    #[test]
    fn compressed_detection() {
        assert_eq!(compressed_suffix("/lib/modules/a.ko.xz"), Some(".ko.xz"));
        assert_eq!(compressed_suffix("/lib/modules/a.ko.zst"), Some(".ko.zst"));
        assert_eq!(compressed_suffix("/lib/modules/a.ko"), None);
    }

    #[test]
    fn missing_list_is_fine() {
        assert_eq!(
            load_all(Path::new("/nonexistent/vmrig/modules"), |_| true),
            0
        );
    }

    #[test]
    fn names_and_what_boot_needs() {
        assert_eq!(module_name("/lib/modules/kernel/fs/9p/9p.ko"), "9p");
        assert_eq!(
            module_name("/lib/modules/kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("ext4.ko.xz"), "ext4");
        assert!(needed_for_boot("virtio_pci", false));
        assert!(needed_for_boot("ext4", false));
        assert!(!needed_for_boot("9pnet_virtio", false));
        assert!(!needed_for_boot("fscache", true));
        assert!(!needed_for_boot("overlay", false));
        assert!(needed_for_boot("overlay", true));
    }
}
