//! A file `source` on the host: one file, or a directory copied as a whole tree.
//!
//! [`source_tree`] is the one definition of what a directory `source` holds: the parser checks
//! it (so a special file is a test-file error with its place), the per-node layer copies it,
//! and the result cache hashes it ([`source_digest`]).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What an entry of a directory `source` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Dir,
    /// A symlink, kept as a link with this target (never followed, wherever it points).
    Symlink(String),
}

/// One entry of a directory `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// The path below the top, `/`-separated; `""` for the top directory itself.
    pub rel: String,
    /// Where it is on the host.
    pub host: PathBuf,
    /// Permission bits (with setuid, setgid and sticky), as on the host.
    pub mode: u32,
    pub kind: SourceKind,
}

/// Why a directory `source` cannot be copied.
#[derive(Debug)]
pub enum SourceError {
    /// Reading a directory or an entry failed.
    Io { path: PathBuf, err: io::Error },
    /// A socket, FIFO or device: only files, directories and symlinks are copied.
    Special { rel: String, what: &'static str },
    /// A name or a link target that is not UTF-8.
    NotUtf8 { rel: String },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            SourceError::Special { rel, what } => write!(f, "{rel} is {what}"),
            SourceError::NotUtf8 { rel } => {
                write!(f, "{rel} has a name or link target that is not UTF-8")
            }
        }
    }
}

impl std::error::Error for SourceError {}

impl From<SourceError> for io::Error {
    fn from(e: SourceError) -> io::Error {
        match e {
            SourceError::Io { path, err } => {
                io::Error::new(err.kind(), format!("{}: {err}", path.display()))
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// What kind of special file `ft` is, if it is one (not a file, directory or symlink).
pub fn special_kind(ft: fs::FileType) -> Option<&'static str> {
    if ft.is_socket() {
        Some("a socket")
    } else if ft.is_fifo() {
        Some("a named pipe (FIFO)")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_file() || ft.is_dir() || ft.is_symlink() {
        None
    } else {
        Some("a special file")
    }
}

/// The tree of the directory `top`: the top itself first (`rel` `""`, its mode as the
/// directory `top` names, a symlink to a directory followed), then every entry, depth first
/// in byte order of the names, each directory before what it holds. Symlinks inside are
/// entries of their own and are never followed. The first special file, non-UTF-8 name or
/// unreadable directory is an error.
pub fn source_tree(top: &Path) -> Result<Vec<SourceEntry>, SourceError> {
    let meta = fs::metadata(top).map_err(|err| SourceError::Io {
        path: top.to_path_buf(),
        err,
    })?;
    let mut entries = vec![SourceEntry {
        rel: String::new(),
        host: top.to_path_buf(),
        mode: meta.mode() & 0o7777,
        kind: SourceKind::Dir,
    }];
    walk(top, "", &mut entries)?;
    Ok(entries)
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<SourceEntry>) -> Result<(), SourceError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |err| SourceError::Io { path, err }
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        names.push(entry.map_err(io_err(dir))?.file_name());
    }
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let Some(name) = name.to_str() else {
            return Err(SourceError::NotUtf8 {
                rel: join(rel, &name.to_string_lossy()),
            });
        };
        let rel = join(rel, name);
        let meta = fs::symlink_metadata(&host).map_err(io_err(&host))?;
        let ft = meta.file_type();
        if let Some(what) = special_kind(ft) {
            return Err(SourceError::Special { rel, what });
        }
        let kind = if ft.is_symlink() {
            let target = fs::read_link(&host).map_err(io_err(&host))?;
            match target.into_os_string().into_string() {
                Ok(t) => SourceKind::Symlink(t),
                Err(_) => return Err(SourceError::NotUtf8 { rel }),
            }
        } else if ft.is_dir() {
            SourceKind::Dir
        } else {
            SourceKind::File
        };
        let is_dir = kind == SourceKind::Dir;
        out.push(SourceEntry {
            rel: rel.clone(),
            host: host.clone(),
            mode: meta.mode() & 0o7777,
            kind,
        });
        if is_dir {
            walk(&host, &rel, out)?;
        }
    }
    Ok(())
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{rel}/{name}")
    }
}

/// What identifies the content of a `source`: `sha256:<hex>` of a file's bytes, or
/// `tree-sha256:<hex>` of a directory's tree (every entry's path, kind and mode, each link's
/// target and each file's bytes, in [`source_tree`] order, length-prefixed, a file by the SHA-256 of its bytes). An unchanged
/// tree gives the same digest wherever it is and whatever its timestamps.
pub fn source_digest(path: &Path) -> io::Result<String> {
    if !fs::metadata(path)?.is_dir() {
        return Ok(format!(
            "sha256:{}",
            hex::encode(Sha256::digest(fs::read(path)?))
        ));
    }
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for e in source_tree(path)? {
        let tag: &[u8] = match &e.kind {
            SourceKind::File => b"f",
            SourceKind::Dir => b"d",
            SourceKind::Symlink(_) => b"l",
        };
        field(&mut h, tag);
        field(&mut h, e.rel.as_bytes());
        h.update(e.mode.to_le_bytes());
        match &e.kind {
            SourceKind::Symlink(target) => field(&mut h, target.as_bytes()),
            SourceKind::File => {
                let mut file_hash = Sha256::new();
                io::copy(&mut fs::File::open(&e.host)?, &mut file_hash)?;
                h.update(file_hash.finalize());
            }
            SourceKind::Dir => {}
        }
    }
    Ok(format!("tree-sha256:{}", hex::encode(h.finalize())))
}
