//! A full disk behind an error, decided from the error's kind (`ENOSPC`, `EDQUOT`), never
//! from its text.

use std::error::Error as StdError;
use std::io;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// Whether `e` says that a disk, or a disk quota, is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// A disk (or a disk quota) found full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskFull {
    /// What was being written on it, when the error says so.
    pub path: Option<PathBuf>,
}

impl DiskFull {
    /// Full where `path` is.
    pub fn at(path: &Path) -> DiskFull {
        DiskFull {
            path: Some(path.to_owned()),
        }
    }
}

/// The full disk behind `err` or one of its causes: a [`StoreError`] about a path on it, or
/// an [`io::Error`] that says so (the place then unknown).
pub fn disk_full_in(err: &(dyn StdError + 'static)) -> Option<DiskFull> {
    std::iter::successors(Some(err), |&e| e.source()).find_map(|e| {
        if let Some(store) = e.downcast_ref::<StoreError>() {
            store.disk_full()
        } else {
            e.downcast_ref::<io::Error>()
                .filter(|io| is_disk_full(io))
                .map(|_| DiskFull::default())
        }
    })
}

impl StoreError {
    /// The path this error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StoreError::NoStoreDir
            | StoreError::BadSize { .. }
            | StoreError::InvalidName { .. } => None,
            StoreError::CreateDir { path, .. }
            | StoreError::Lock { path, .. }
            | StoreError::CreateTemp { path, .. }
            | StoreError::Build { path, .. }
            | StoreError::Sync { path, .. }
            | StoreError::ForeignFile { path, .. }
            | StoreError::SetPermissions { path, .. }
            | StoreError::Read { path, .. }
            | StoreError::Remove { path, .. }
            | StoreError::RecordUse { path, .. }
            | StoreError::ForeignOwner { path, .. }
            | StoreError::Gone { path } => Some(path),
            StoreError::Publish { to, .. } => Some(to),
        }
    }

    /// The full disk that made this operation fail, if that is why: at the path the error
    /// names.
    pub fn disk_full(&self) -> Option<DiskFull> {
        let path = self.path().map(Path::to_owned);
        match self {
            // A builder's error: where it says, else the path being built.
            StoreError::Build { source, .. } => disk_full_in(source.as_ref()).map(|d| DiskFull {
                path: d.path.or(path),
            }),
            _ => {
                let io = self.source()?.downcast_ref::<io::Error>()?;
                is_disk_full(io).then_some(DiskFull { path })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_by_the_error_kind_not_the_text() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EACCES)));
        // Text alone is not enough.
        assert!(!is_disk_full(&io::Error::other("No space left on device")));
    }

    #[test]
    fn a_store_error_says_where_the_disk_is_full() {
        let err = StoreError::CreateDir {
            path: "/s/.locks".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(err.disk_full(), Some(DiskFull::at(Path::new("/s/.locks"))));
        let denied = StoreError::CreateDir {
            path: "/s/.locks".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(denied.disk_full(), None);
        assert_eq!(StoreError::NoStoreDir.disk_full(), None);
        // A builder's io error: the path being built.
        let build = StoreError::Build {
            path: "/s/.tmp/x".into(),
            source: Box::new(io::Error::from_raw_os_error(libc::ENOSPC)),
        };
        assert_eq!(
            build.disk_full(),
            Some(DiskFull::at(Path::new("/s/.tmp/x")))
        );
        // Found through the causes of another error.
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] StoreError);
        assert_eq!(
            disk_full_in(&Outer(err)),
            Some(DiskFull::at(Path::new("/s/.locks")))
        );
        let bare = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(disk_full_in(&bare), Some(DiskFull::default()));
        assert_eq!(disk_full_in(&Outer(denied)), None);
    }
}
