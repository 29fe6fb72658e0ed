//! A minimal writer for the newc cpio format the Linux kernel unpacks as an initramfs
//! (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Written here rather than taken from a crate because we need device nodes
//! (`/dev/console`) and directories with exact modes, without root, and nothing else.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

/// Appends entries to a newc archive. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | mode, 2, (0, 0), &[])?;
        }
        Ok(())
    }

    /// Creates every missing parent directory of `path` (mode 0755).
    pub fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix.clone(), 0o755)?;
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | mode, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | mode, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        // Pad to cpio's 512-byte block size: the kernel does not need it, `cpio -i` does.
        let pad = (512 - (self.written % 512) as usize) % 512;
        self.write(&vec![0u8; pad])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so archives are reproducible
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The host's `cpio` reads our archive back (skipped when cpio is not installed).
    #[test]
    fn host_cpio_lists_and_extracts_entries() {
        let Some(cpio) = crate::tools::find_program("cpio") else {
            return;
        };
        let mut w = CpioWriter::new(Vec::new());
        w.parents("a/b/c.txt").unwrap();
        w.file("a/b/c.txt", 0o640, b"hello\n").unwrap();
        w.symlink("a/link", "b/c.txt").unwrap();
        w.char_device("a/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("x.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let out = Command::new(cpio)
            .args(["-itv", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            listing.contains("-rw-r----- ") && listing.contains("a/b/c.txt"),
            "{listing}"
        );
        assert!(listing.contains("a/link -> b/c.txt"), "{listing}");
        assert!(
            listing.contains("crw-------") && listing.contains("5,"),
            "{listing}"
        );
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let status = Command::new(crate::tools::find_program("cpio").unwrap())
            .current_dir(&extract)
            .args(["-id", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .arg("a/b/c.txt")
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        assert_eq!(
            std::fs::read(extract.join("a/b/c.txt")).unwrap(),
            b"hello\n"
        );
    }

    #[test]
    fn parents_are_emitted_once() {
        let mut w = CpioWriter::new(Vec::new());
        w.parents("x/y/z").unwrap();
        w.parents("x/y/w").unwrap();
        assert_eq!(w.dirs.len(), 2);
    }
}
