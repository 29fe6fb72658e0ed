//! Making room on the store's disk before a build, as Nix's `min-free`/`max-free`: when
//! the free space falls below a floor, the least recently used paths that nobody uses
//! are removed until a target is free again. A store is a cache (every path can be
//! rebuilt), so a full disk should cost a rebuild, never a failed run.

use std::path::Path;
use std::time::SystemTime;

use crate::lock::Mode;
use crate::{mtime, GcReport, Store, StoreError};

/// Free-space floor; below it, a build first collects. `0` turns collection off.
pub const MIN_FREE_ENV: &str = "VMRIG_STORE_MIN_FREE";
/// What collection frees up to.
pub const TARGET_FREE_ENV: &str = "VMRIG_STORE_TARGET_FREE";

/// When [`Store::make_room`] collects, and how far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeSpace {
    /// Collect when fewer bytes than this are free (`0`: never).
    pub min_free: u64,
    /// Collect until this many bytes are free (or nothing more can go).
    pub target_free: u64,
}

const GIB: u64 = 1 << 30;

impl Default for FreeSpace {
    /// A root image build needs up to about 2 GiB of scratch space and a boot snapshot
    /// up to the guest's memory, so 5 GiB is kept free, and a collection frees 10 GiB
    /// so that it does not run again at the next build.
    fn default() -> Self {
        FreeSpace {
            min_free: 5 * GIB,
            target_free: 10 * GIB,
        }
    }
}

impl FreeSpace {
    /// The default, changed by `VMRIG_STORE_MIN_FREE` and `VMRIG_STORE_TARGET_FREE`
    /// (sizes such as `5G`, `512M`, or bytes).
    pub fn from_env() -> Result<FreeSpace, StoreError> {
        let mut space = FreeSpace::default();
        let read = |name: &'static str| -> Result<Option<u64>, StoreError> {
            match std::env::var(name) {
                Ok(text) if !text.trim().is_empty() => parse_size(&text)
                    .map(Some)
                    .ok_or(StoreError::BadSize { var: name, text }),
                _ => Ok(None),
            }
        };
        if let Some(min) = read(MIN_FREE_ENV)? {
            space.min_free = min;
            space.target_free = space.target_free.max(min);
        }
        if let Some(target) = read(TARGET_FREE_ENV)? {
            space.target_free = target.max(space.min_free);
        }
        Ok(space)
    }
}

/// `10G`, `512M`, `64K`, `1T` (powers of 1024, an optional `iB`/`B`), or bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

/// Bytes an unprivileged process may still write to the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

impl Store {
    /// When the store's disk has less than `min_free` free, removes stale temporary
    /// directories and then the least recently used paths not in use, until
    /// `target_free` is free. Returns what it removed (nothing when there was room).
    pub fn make_room(&self) -> Result<GcReport, StoreError> {
        self.make_room_to(self.free_space)
    }

    /// [`Store::make_room`] with another floor and target (`vmrig store gc --free`).
    pub fn make_room_to(&self, space: FreeSpace) -> Result<GcReport, StoreError> {
        self.make_room_with(space, || free_bytes(&self.root))
    }

    /// [`Store::make_room`] with the free space measured by `free` (tests fake a disk).
    pub(crate) fn make_room_with(
        &self,
        space: FreeSpace,
        free: impl Fn() -> Option<u64>,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let enough = |target: u64| free().is_none_or(|f| f >= target);
        if space.min_free == 0 || enough(space.min_free) {
            return Ok(report);
        }
        self.gc_tmp(false, &mut report)?;
        // Oldest use first; paths never recorded age from their own modification time.
        let mut candidates: Vec<(Option<SystemTime>, String)> = self
            .base_names()?
            .into_iter()
            .map(|base| {
                let used = mtime(&self.uses_path(&base)).or_else(|| mtime(&self.root.join(&base)));
                (used, base)
            })
            .collect();
        candidates.sort();
        for (_, base) in candidates {
            if enough(space.target_free) {
                break;
            }
            let Some(_lock) = self.try_lock(&base, Mode::Exclusive)? else {
                continue;
            };
            if std::fs::symlink_metadata(self.root.join(&base)).is_err() {
                continue;
            }
            let entry = self.entry(&base, false);
            self.remove_locked(&base)?;
            report.freed_bytes += entry.size_bytes;
            report.removed.push(entry);
        }
        Ok(report)
    }
}

/// One line on a collection [`Store::make_room`] did, for a build's log.
pub fn describe_room(report: &GcReport, root: &Path) -> String {
    let mib = |b: u64| b.div_ceil(1 << 20);
    let left = free_bytes(root)
        .map(|b| format!(", {} MiB free now", mib(b)))
        .unwrap_or_default();
    format!(
        "the disk of the store {} was nearly full: removed the {} least recently used paths \
         ({} MiB){left}",
        root.display(),
        report.removed.len(),
        mib(report.freed_bytes)
    )
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;
    use crate::StoreKey;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_size("5G"), Some(5 * GIB));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size(" 10 GiB "), Some(10 * GIB));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        for bad in ["", "G", "5X", "-1G", "1.5G", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    /// A store whose "disk" is `capacity` bytes minus the bytes of its paths.
    fn fake_disk(store: &Store, capacity: u64) -> impl Fn() -> Option<u64> + '_ {
        move || {
            let used: u64 = store.list().unwrap().iter().map(|e| e.size_bytes).sum();
            Some(capacity.saturating_sub(used))
        }
    }

    fn path_of(store: &Store, name: &str, bytes: usize, age_secs: u64) -> crate::StorePath {
        let sp = store
            .build(&StoreKey::new(name, name.as_bytes()), |out| {
                std::fs::write(out.join("data"), vec![1u8; bytes])
            })
            .unwrap();
        let used = SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::options()
            .write(true)
            .open(store.uses_path(&sp.base_name()))
            .unwrap()
            .set_modified(used)
            .unwrap();
        sp
    }

    #[test]
    fn a_full_disk_loses_the_least_recently_used_paths_first_and_never_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let oldest = path_of(&store, "oldest", 64 << 10, 300);
        let in_use = path_of(&store, "in-use", 64 << 10, 200);
        let older = path_of(&store, "older", 64 << 10, 100);
        let newest = path_of(&store, "newest", 64 << 10, 0);
        let _guard = store.use_path(&in_use).unwrap();
        let used: u64 = store.list().unwrap().iter().map(|e| e.size_bytes).sum();
        let each = used / 4;
        // One path's worth free, two wanted: the two oldest unused paths go.
        let space = FreeSpace {
            min_free: 2 * each,
            target_free: 3 * each,
        };
        let report = store
            .make_room_with(space, fake_disk(&store, used + each))
            .unwrap();
        let removed: Vec<_> = report.removed.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(removed, ["oldest", "older"]);
        assert!(store.lookup(&in_use.key()).is_some());
        assert!(store.lookup(&newest.key()).is_some());
        assert!(store.lookup(&oldest.key()).is_none());
        assert!(store.lookup(&older.key()).is_none());
    }

    #[test]
    fn enough_room_or_a_floor_of_zero_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        path_of(&store, "a", 1024, 1000);
        let plenty = FreeSpace::default();
        let report = store.make_room_with(plenty, || Some(u64::MAX)).unwrap();
        assert!(report.removed.is_empty());
        let off = FreeSpace {
            min_free: 0,
            target_free: 0,
        };
        let report = store.make_room_with(off, || Some(0)).unwrap();
        assert!(report.removed.is_empty());
        let called = Cell::new(0);
        let unknown = store
            .make_room_with(plenty, || {
                called.set(called.get() + 1);
                None
            })
            .unwrap();
        assert!(
            unknown.removed.is_empty(),
            "an unknown free space removes nothing"
        );
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
