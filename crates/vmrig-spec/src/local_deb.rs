//! Local Debian package files in `packages` (`"./build/foo.deb"`): which entries are files,
//! and whether a file is a Debian package (checked at parse time, so a wrong path is a test
//! file error with its place, not a failed image build).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Whether a `packages` entry names a file rather than an archive package: it starts with
/// `./`, `../` or `/` (as `apt-get install ./foo.deb` tells them apart).
pub fn is_local_path(entry: &str) -> bool {
    entry.starts_with("./") || entry.starts_with("../") || entry.starts_with('/')
}

/// Why a local package file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DebProblem {
    #[error("{0}")]
    Unreadable(std::io::Error),
    #[error("is not a regular file")]
    NotAFile,
    #[error("is not a Debian package (no `ar` archive with a `debian-binary` member)")]
    NotADeb,
}

/// The hex SHA-256 of the Debian package at `path`, after checking that it is one: an `ar`
/// archive (`!<arch>\n`) whose first member is `debian-binary`, as dpkg-deb writes it.
pub fn check_deb(path: &Path) -> Result<String, DebProblem> {
    let meta = std::fs::metadata(path).map_err(DebProblem::Unreadable)?;
    if !meta.is_file() {
        return Err(DebProblem::NotAFile);
    }
    let mut file = std::fs::File::open(path).map_err(DebProblem::Unreadable)?;
    // Magic (8 bytes), then the first member's header: its name in 16 bytes.
    let mut head = [0u8; 24];
    let mut got = 0;
    while got < head.len() {
        match file
            .read(&mut head[got..])
            .map_err(DebProblem::Unreadable)?
        {
            0 => return Err(DebProblem::NotADeb),
            n => got += n,
        }
    }
    let name = std::str::from_utf8(&head[8..]).unwrap_or("");
    if &head[..8] != b"!<arch>\n" || name.trim_end().trim_end_matches('/') != "debian-binary" {
        return Err(DebProblem::NotADeb);
    }
    let mut hasher = Sha256::new();
    hasher.update(head);
    std::io::copy(&mut file, &mut hasher).map_err(DebProblem::Unreadable)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_told_from_package_names() {
        for path in ["./a.deb", "../b/c.deb", "/abs/d.deb", "./noext"] {
            assert!(is_local_path(path), "{path}");
        }
        for name in ["curl", "libc6", "a.deb"] {
            assert!(!is_local_path(name), "{name}");
        }
    }

    #[test]
    fn only_an_ar_archive_led_by_debian_binary_is_a_package() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("ok.deb");
        let bytes = b"!<arch>\ndebian-binary   1700000000  0     0     100644  4         `\n2.0\n";
        std::fs::write(&deb, bytes).unwrap();
        assert_eq!(check_deb(&deb).unwrap(), hex::encode(Sha256::digest(bytes)));

        let text = dir.path().join("text.deb");
        std::fs::write(&text, "not a package at all, but long enough").unwrap();
        assert!(matches!(check_deb(&text), Err(DebProblem::NotADeb)));
        let short = dir.path().join("short.deb");
        std::fs::write(&short, "!<arch>\n").unwrap();
        assert!(matches!(check_deb(&short), Err(DebProblem::NotADeb)));
        let other_ar = dir.path().join("lib.deb");
        std::fs::write(&other_ar, b"!<arch>\nfoo.o/          0").unwrap();
        assert!(matches!(check_deb(&other_ar), Err(DebProblem::NotADeb)));
        assert!(matches!(check_deb(dir.path()), Err(DebProblem::NotAFile)));
        assert!(matches!(
            check_deb(&dir.path().join("missing.deb")),
            Err(DebProblem::Unreadable(_))
        ));
    }
}
