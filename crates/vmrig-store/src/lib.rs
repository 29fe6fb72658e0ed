//! vmrig-store: the content-addressed store that guest images, kernels and
//! initramfs images are built into.
//!
//! Layout of a store rooted at `<store>`:
//!
//! ```text
//! <store>/<hash>-<name>             complete store paths (directories), nothing else
//! <store>/.locks/<hash>-<name>.lock flock: exclusive while building or deleting,
//!                                   shared while in use (see [`UseGuard`])
//! <store>/.uses/<hash>-<name>       mtime = last time the path was used
//! <store>/.tmp/<hash>-<name>.<pid>.<random>[.deleting]
//!                                   builds in progress, paths being deleted, and
//!                                   leftovers of killed processes (removed by gc)
//! ```
//!
//! A store path only ever appears at `<store>/<hash>-<name>` through an atomic
//! `rename(2)` of a fully written and fsynced temporary directory, so anything
//! found there is complete. Lock files are never deleted (deleting a lock file
//! that another process is waiting on would let two processes hold "the" lock).

use std::error::Error as StdError;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

mod full;
mod lock;
pub mod remote;
mod room;

pub use full::{disk_full_in, is_disk_full, DiskFull};
pub use room::{describe_room, free_bytes, parse_size, FreeSpace, MIN_FREE_ENV, TARGET_FREE_ENV};

use lock::Mode;

/// Number of hex characters of the sha256 digest used in store path names.
pub const HASH_LEN: usize = 32;
/// Longest accepted store path name (the part after `<hash>-`).
pub const MAX_NAME_LEN: usize = 180;

const LOCKS_DIR: &str = ".locks";
const TMP_DIR: &str = ".tmp";
const USES_DIR: &str = ".uses";
const DELETING_SUFFIX: &str = ".deleting";

/// Boxed error returned by a builder closure.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Errors of store operations. Messages read well after "failed to" and name
/// the path involved; the underlying cause is available through
/// [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("find the store directory: none of VMRIG_STORE, XDG_CACHE_HOME and HOME is set")]
    NoStoreDir,
    #[error("read {var}={text:?}: not a size (write it as 5G, 512M or a number of bytes)")]
    BadSize { var: &'static str, text: String },
    #[error(
        "use {name:?} as a store path name: only a-z, A-Z, 0-9, '.', '_', '+' and '-' are \
         allowed, 1 to {MAX_NAME_LEN} characters"
    )]
    InvalidName { name: String },
    #[error("create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create a temporary build directory in {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The builder closure returned an error; `source` is that error.
    #[error("build {path}")]
    Build {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("sync {path} to disk")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "publish {path}: it belongs to {owner}, not to the store's user (a builder left a \
         file of another user; this is a bug in vmrig)"
    )]
    ForeignFile { path: PathBuf, owner: String },
    #[error("set the permissions of {path}")]
    SetPermissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("move {from} into place at {to}")]
    Publish {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record the use of {path}")]
    RecordUse {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A store belongs to one user: root's and a user's never mix.
    #[error(
        "use the store {store}: {path} belongs to {owner}, but vmrig runs as {me}, and a store \
         is used by one user only; {fix}"
    )]
    ForeignOwner {
        store: PathBuf,
        path: PathBuf,
        owner: String,
        me: String,
        fix: String,
    },
    /// The path was garbage-collected between lookup and use; look it up (or
    /// build it) again.
    #[error("use {path}: it is no longer in the store")]
    Gone { path: PathBuf },
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

fn is_hash(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Splits `<hash>-<name>` into its parts if it is a well-formed store path name.
fn parse_base(base: &str) -> Option<(&str, &str)> {
    let (hash, name) = base.split_at_checked(HASH_LEN)?;
    let name = name.strip_prefix('-')?;
    (is_hash(hash) && is_valid_name(name)).then_some((hash, name))
}

/// Recovers `<hash>-<name>` from a `.tmp` entry name
/// `<hash>-<name>.<pid>.<random>[.deleting]`.
fn tmp_entry_base(entry: &str) -> Option<&str> {
    let entry = entry.strip_suffix(DELETING_SUFFIX).unwrap_or(entry);
    let mut parts = entry.rsplitn(3, '.');
    let random = parts.next()?;
    let pid = parts.next()?;
    let base = parts.next()?;
    let ok = !random.is_empty()
        && random.bytes().all(|b| b.is_ascii_alphanumeric())
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit());
    (ok && parse_base(base).is_some()).then_some(base)
}

/// The identity of a store path: a name plus the hash of everything that went
/// into it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreKey {
    hash: String,
    name: String,
}

impl StoreKey {
    /// Key for `name`, hashing `inputs_hash_material` (sha256, first
    /// [`HASH_LEN`] hex characters). Callers include their builder version in
    /// the material.
    ///
    /// # Panics
    /// If `name` is not a valid store path name (see [`StoreKey::try_new`]);
    /// names are chosen by vmrig's code, so that is a bug.
    pub fn new(name: &str, inputs_hash_material: &[u8]) -> StoreKey {
        match StoreKey::try_new(name, inputs_hash_material) {
            Ok(key) => key,
            Err(e) => panic!("invalid store key: failed to {e}"),
        }
    }

    /// Like [`StoreKey::new`], but returns an error for a name that is not
    /// `[a-zA-Z0-9._+-]{1,MAX_NAME_LEN}`.
    pub fn try_new(name: &str, inputs_hash_material: &[u8]) -> Result<StoreKey, StoreError> {
        if !is_valid_name(name) {
            return Err(StoreError::InvalidName {
                name: name.to_owned(),
            });
        }
        let digest = Sha256::digest(inputs_hash_material);
        let mut hash = hex::encode(digest);
        hash.truncate(HASH_LEN);
        Ok(StoreKey {
            hash,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// `<hash>-<name>`, the file name of the store path.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    /// The key of a store path named `<hash>-<name>` (as `store list` and a remote cache
    /// show them), `None` if `base` is not such a name.
    pub fn from_base_name(base: &str) -> Option<StoreKey> {
        let (hash, name) = parse_base(base)?;
        Some(StoreKey {
            hash: hash.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A complete path in the store (a directory).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorePath {
    path: PathBuf,
    hash: String,
    name: String,
}

impl StorePath {
    /// Absolute (if the store root is) path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// `<hash>-<name>`, the file name of the store path.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    pub fn key(&self) -> StoreKey {
        StoreKey {
            hash: self.hash.clone(),
            name: self.name.clone(),
        }
    }
}

/// Held while a store path is read; gc never removes a path that has a guard.
///
/// Holds a shared flock on the path's lock file until dropped, and records the
/// time of use when taken and when dropped.
#[derive(Debug)]
pub struct UseGuard {
    _lock: File,
    path: StorePath,
    uses_file: PathBuf,
}

impl UseGuard {
    pub fn store_path(&self) -> &StorePath {
        &self.path
    }

    pub fn path(&self) -> &Path {
        self.path.path()
    }
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        let _ = touch(&self.uses_file);
    }
}

/// One store path as reported by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub hash: String,
    pub path: PathBuf,
    /// Disk usage (allocated blocks) of everything under the path.
    pub size_bytes: u64,
    /// Last recorded use (build, [`Store::use_path`]); `None` if never recorded.
    pub last_used: Option<SystemTime>,
    /// Someone holds the path's lock (a [`UseGuard`], or a build/gc in progress).
    pub in_use: bool,
}

/// What [`Store::gc`] removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcPolicy {
    /// Remove paths whose last use is at least this long ago. Zero means every
    /// path not in use.
    pub older_than: Duration,
    /// Report what would be removed without removing anything.
    pub dry_run: bool,
    /// Only paths whose name (the part after the hash) starts with this, e.g.
    /// `snapshot-` for boot snapshots; `None`: every path.
    pub name_prefix: Option<String>,
}

impl Default for GcPolicy {
    /// Seven days, not a dry run.
    fn default() -> Self {
        GcPolicy {
            older_than: Duration::from_secs(7 * 24 * 60 * 60),
            dry_run: false,
            name_prefix: None,
        }
    }
}

/// Outcome of [`Store::gc`]. On a dry run, lists what would have been removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<Entry>,
    /// Paths skipped because their lock was held (in use, or being collected
    /// by another gc), whatever their age.
    pub kept_in_use: Vec<Entry>,
    /// Paths used within `older_than`.
    pub kept_recent: Vec<Entry>,
    /// Stale temporary directories (killed builds, interrupted deletions).
    pub removed_tmp: Vec<PathBuf>,
    /// Bytes freed by `removed` and `removed_tmp`.
    pub freed_bytes: u64,
}

/// Where [`Store::open_default`] puts the store: `$VMRIG_STORE`, else
/// `$XDG_CACHE_HOME/vmrig/store`, else `~/.cache/vmrig/store`.
pub fn default_store_dir() -> Result<PathBuf, StoreError> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("VMRIG_STORE") {
        return Ok(PathBuf::from(dir));
    }
    // The XDG spec says relative values are to be ignored.
    if let Some(cache) = var("XDG_CACHE_HOME").filter(|v| Path::new(v).is_absolute()) {
        return Ok(PathBuf::from(cache).join("vmrig").join("store"));
    }
    if let Some(home) = var("HOME") {
        return Ok(PathBuf::from(home)
            .join(".cache")
            .join("vmrig")
            .join("store"));
    }
    Err(StoreError::NoStoreDir)
}

fn create_dir_all(path: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` if needed and sets its mtime to now.
fn touch(path: &Path) -> io::Result<()> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.set_modified(SystemTime::now())
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::symlink_metadata(path).and_then(|m| m.modified()).ok()
}

/// Disk usage of everything under `path` (not following symlinks).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                total += disk_usage(&entry.path());
            }
        }
    }
    total
}

/// fsyncs every file and directory under `path`, and `path` itself.
fn sync_tree(path: &Path) -> Result<(), StoreError> {
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| StoreError::Sync { path: p, source }
    };
    let meta = fs::symlink_metadata(path).map_err(err(path))?;
    // Everything in a store path belongs to the store's user and is readable by them.
    if meta.uid() != euid() {
        return Err(StoreError::ForeignFile {
            path: path.to_owned(),
            owner: user_label(meta.uid()),
        });
    }
    let mode = meta.permissions().mode();
    let wanted = if meta.is_dir() { 0o500 } else { 0o400 };
    if !meta.file_type().is_symlink() && mode & wanted != wanted {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | wanted)).map_err(|source| {
            StoreError::SetPermissions {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(err(path))? {
            let entry = entry.map_err(err(path))?;
            sync_tree(&entry.path())?;
        }
    }
    if meta.is_dir() || meta.is_file() {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(err(path))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Sync {
            path: path.to_owned(),
            source,
        })
}

fn remove_tree(path: &Path) -> Result<(), StoreError> {
    remove_all(path).map_err(|source| StoreError::Remove {
        path: path.to_owned(),
        source,
    })
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Removes `path` (a file or a whole tree; absent is fine). As a normal user, a tree that
/// holds files of the user's subordinate ids (left by a build in a user namespace, e.g.
/// mmdebstrap's unshare mode) is removed from a user namespace that maps those ids.
pub fn remove_all(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && euid() != 0 => {
            let status = std::process::Command::new("unshare")
                .args(["--map-root-user", "--map-auto", "--", "rm", "-rf", "--"])
                .arg(path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            match status {
                Ok(s) if s.success() && fs::symlink_metadata(path).is_err() => Ok(()),
                _ => Err(e),
            }
        }
        other => other,
    }
}

/// The login name of `uid`, else the number.
fn user_label(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed passwd is a valid out value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: valid buffers; `result` points into `pwd` on success.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        // SAFETY: pw_name is a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        format!("{} (uid {uid})", name.to_string_lossy())
    } else {
        format!("uid {uid}")
    }
}

/// Set to `1` to let root use a store owned by another user (a store is otherwise used by
/// its owner only).
pub const ALLOW_FOREIGN_ENV: &str = "VMRIG_STORE_ALLOW_FOREIGN";

/// Refuses a store (its root, its bookkeeping directories, its top-level paths) that holds
/// something owned by another uid than `me`.
fn check_owner(root: &Path, me: u32) -> Result<(), StoreError> {
    let mut paths = vec![root.to_owned()];
    for sub in [LOCKS_DIR, TMP_DIR, USES_DIR, ".results"] {
        paths.push(root.join(sub));
    }
    if let Ok(entries) = fs::read_dir(root) {
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        paths.extend(names);
    }
    for path in paths {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.uid() == me {
            continue;
        }
        let owner = user_label(meta.uid());
        let me_label = user_label(me);
        let fix = if me == 0 {
            format!(
                "run vmrig as that user, give root a store of its own (VMRIG_STORE=DIR), or \
                 set {ALLOW_FOREIGN_ENV}=1 to let root write into it"
            )
        } else if path == root {
            "use a store of your own: unset VMRIG_STORE (the default is \
             $XDG_CACHE_HOME/vmrig/store) or point it at a directory of yours"
                .to_owned()
        } else {
            format!(
                "remove it (`sudo rm -rf {}`) or give it to you (`sudo chown -R {} {}`)",
                path.display(),
                me,
                path.display()
            )
        };
        return Err(StoreError::ForeignOwner {
            store: root.to_owned(),
            path,
            owner,
            me: me_label,
            fix,
        });
    }
    Ok(())
}

/// A content-addressed store of directories. Cheap to clone; any number of
/// `Store` values and processes may use the same directory at once.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// When [`Store::make_room`] collects.
    free_space: FreeSpace,
}

impl Store {
    /// Opens the store at [`default_store_dir`], creating it if needed.
    pub fn open_default() -> Result<Store, StoreError> {
        Store::open(default_store_dir()?)
    }

    /// Opens the store at `path`, creating it if needed.
    ///
    /// A store is one user's: a store (or a path in it) owned by another uid is refused
    /// with [`StoreError::ForeignOwner`], before anything is written into it. Root may be
    /// let in with `VMRIG_STORE_ALLOW_FOREIGN=1`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = path.into();
        let me = euid();
        let allowed =
            me == 0 && std::env::var(ALLOW_FOREIGN_ENV).is_ok_and(|v| v == "1" || v == "true");
        if !allowed {
            check_owner(&root, me)?;
        }
        for sub in [LOCKS_DIR, TMP_DIR, USES_DIR] {
            create_dir_all(&root.join(sub))?;
        }
        Ok(Store {
            root,
            free_space: FreeSpace::from_env()?,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This store with another free-space policy than the environment's.
    pub fn with_free_space(mut self, free_space: FreeSpace) -> Store {
        self.free_space = free_space;
        self
    }

    fn lock_path(&self, base: &str) -> PathBuf {
        self.root.join(LOCKS_DIR).join(format!("{base}.lock"))
    }

    fn uses_path(&self, base: &str) -> PathBuf {
        self.root.join(USES_DIR).join(base)
    }

    fn lock(&self, base: &str, mode: Mode) -> Result<File, StoreError> {
        let path = self.lock_path(base);
        lock::lock(&path, mode).map_err(|source| StoreError::Lock { path, source })
    }

    fn try_lock(&self, base: &str, mode: Mode) -> Result<Option<File>, StoreError> {
        let path = self.lock_path(base);
        lock::try_lock(&path, mode).map_err(|source| StoreError::Lock { path, source })
    }

    fn store_path(&self, key: &StoreKey) -> StorePath {
        StorePath {
            path: self.root.join(key.base_name()),
            hash: key.hash.clone(),
            name: key.name.clone(),
        }
    }

    /// The path for `key` if it is in the store (only complete paths ever are).
    pub fn lookup(&self, key: &StoreKey) -> Option<StorePath> {
        let sp = self.store_path(key);
        match fs::symlink_metadata(&sp.path) {
            Ok(m) if m.is_dir() => Some(sp),
            _ => None,
        }
    }

    /// Returns the path for `key`, building it first if it is not in the store.
    ///
    /// `builder` is called with a fresh, empty directory and must write the
    /// path's contents into it. Concurrent calls for the same key, from any
    /// thread or process, run the builder once: the others wait on the key's
    /// lock and then find the path done. If the builder fails or panics, its
    /// temporary directory is removed and nothing is published (a panic
    /// propagates). The builder should not take a [`UseGuard`] on the same key
    /// (that would deadlock).
    pub fn build<F, E>(&self, key: &StoreKey, builder: F) -> Result<StorePath, StoreError>
    where
        F: FnOnce(&Path) -> Result<(), E>,
        E: Into<BoxError>,
    {
        if let Some(found) = self.lookup(key) {
            return Ok(found);
        }
        let base = key.base_name();
        let _lock = self.lock(&base, Mode::Exclusive)?;
        if let Some(found) = self.lookup(key) {
            return Ok(found);
        }

        // Holding the exclusive lock, any temporary directory of this key is
        // a leftover of a killed process.
        self.remove_stale_tmp_of(&base);

        let tmp_root = self.root.join(TMP_DIR);
        create_dir_all(&tmp_root)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{base}.{}.", std::process::id()))
            .rand_bytes(8)
            .tempdir_in(&tmp_root)
            .map_err(|source| StoreError::CreateTemp {
                path: tmp_root.clone(),
                source,
            })?;
        let sp = self.store_path(key);

        // `tmp` (a TempDir) removes the directory when dropped, including
        // while unwinding from a panicking builder.
        if let Err(e) = builder(tmp.path()) {
            // What a build in a user namespace left needs more than TempDir's removal.
            let _ = remove_all(tmp.path());
            return Err(StoreError::Build {
                path: sp.path.clone(),
                source: e.into(),
            });
        }
        // tempfile creates the directory 0700; store paths are world-readable
        // like the rest of the user's cache.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).map_err(|source| {
            StoreError::SetPermissions {
                path: tmp.path().to_owned(),
                source,
            }
        })?;
        sync_tree(tmp.path())?;

        let tmp_path = tmp.path().to_owned();
        fs::rename(&tmp_path, &sp.path).map_err(|source| StoreError::Publish {
            from: tmp_path.clone(),
            to: sp.path.clone(),
            source,
        })?;
        // Renamed away: nothing left for TempDir to remove.
        let _ = tmp.keep();
        sync_dir(&self.root)?;
        let _ = sync_dir(&tmp_root);
        let uses = self.uses_path(&base);
        touch(&uses).map_err(|source| StoreError::RecordUse { path: uses, source })?;
        Ok(sp)
    }

    /// Marks `path` as in use until the guard is dropped, so gc leaves it
    /// alone, and records the time of use. Waits while the path is being
    /// collected; returns [`StoreError::Gone`] if it was.
    pub fn use_path(&self, path: &StorePath) -> Result<UseGuard, StoreError> {
        let base = path.base_name();
        let lock = self.lock(&base, Mode::Shared)?;
        let sp = self.store_path(&path.key());
        if self.lookup(&path.key()).is_none() {
            return Err(StoreError::Gone { path: sp.path });
        }
        let uses_file = self.uses_path(&base);
        touch(&uses_file).map_err(|source| StoreError::RecordUse {
            path: uses_file.clone(),
            source,
        })?;
        Ok(UseGuard {
            _lock: lock,
            path: sp,
            uses_file,
        })
    }

    /// Well-formed store path names (`<hash>-<name>`) present at the root.
    fn base_names(&self) -> Result<Vec<String>, StoreError> {
        let read_err = |source| StoreError::Read {
            path: self.root.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if parse_base(&name).is_some() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn entry(&self, base: &str, in_use: bool) -> Entry {
        let (hash, name) = parse_base(base).expect("base names are validated");
        let path = self.root.join(base);
        Entry {
            name: name.to_owned(),
            hash: hash.to_owned(),
            size_bytes: disk_usage(&path),
            last_used: mtime(&self.uses_path(base)),
            in_use,
            path,
        }
    }

    /// All paths in the store, sorted by `<hash>-<name>`.
    pub fn list(&self) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        for base in self.base_names()? {
            let in_use = self.try_lock(&base, Mode::Exclusive)?.is_none();
            if fs::symlink_metadata(self.root.join(&base)).is_err() {
                continue; // collected meanwhile
            }
            entries.push(self.entry(&base, in_use));
        }
        Ok(entries)
    }

    /// Removes paths not used within `policy.older_than` and stale temporary
    /// directories. Never removes a path whose lock is held (in use, being
    /// built or being collected by another gc); safe against concurrent
    /// builds, uses and other gcs.
    pub fn gc(&self, policy: &GcPolicy) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let now = SystemTime::now();
        for base in self.base_names()? {
            if let Some(prefix) = &policy.name_prefix {
                let (_, name) = parse_base(&base).expect("base names are validated");
                if !name.starts_with(prefix.as_str()) {
                    continue;
                }
            }
            let Some(_lock) = self.try_lock(&base, Mode::Exclusive)? else {
                if fs::symlink_metadata(self.root.join(&base)).is_ok() {
                    report.kept_in_use.push(self.entry(&base, true));
                }
                continue;
            };
            let path = self.root.join(&base);
            if fs::symlink_metadata(&path).is_err() {
                continue; // collected by a concurrent gc
            }
            let entry = self.entry(&base, false);
            // Paths without a use record (not made by `build`) age from their
            // own modification time.
            let last_used = entry.last_used.or_else(|| mtime(&path));
            let age = last_used
                .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::MAX);
            if age < policy.older_than {
                report.kept_recent.push(entry);
                continue;
            }
            if !policy.dry_run {
                self.remove_locked(&base)?;
            }
            report.freed_bytes += entry.size_bytes;
            report.removed.push(entry);
        }
        self.gc_tmp(policy.dry_run, &mut report)?;
        Ok(report)
    }

    /// Removes the path `base`, whose exclusive lock the caller holds.
    fn remove_locked(&self, base: &str) -> Result<(), StoreError> {
        let path = self.root.join(base);
        // Move out of the way atomically first, so that the path is either complete or
        // absent; then delete at leisure (still holding the lock, so that a killed gc
        // leaves a `.deleting` directory that the next gc removes).
        let doomed = self.root.join(TMP_DIR).join(format!(
            "{base}.{}.{}{DELETING_SUFFIX}",
            std::process::id(),
            random_suffix()
        ));
        fs::rename(&path, &doomed).map_err(|source| StoreError::Remove {
            path: path.clone(),
            source,
        })?;
        let _ = sync_dir(&self.root);
        remove_tree(&doomed)?;
        remove_tree(&self.uses_path(base))
    }

    fn gc_tmp(&self, dry_run: bool, report: &mut GcReport) -> Result<(), StoreError> {
        let tmp_root = self.root.join(TMP_DIR);
        let read_err = |source| StoreError::Read {
            path: tmp_root.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&tmp_root).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            // Entries not made by this crate are left alone.
            let Some(base) = tmp_entry_base(&name) else {
                continue;
            };
            // Builds and deletions hold the key's exclusive lock for the whole
            // life of their temporary directory; a free lock means the owner
            // is gone. (A shared holder means it is in use: also not ours.)
            let Some(_lock) = self.try_lock(base, Mode::Exclusive)? else {
                continue;
            };
            let path = tmp_root.join(&name);
            if fs::symlink_metadata(&path).is_err() {
                continue;
            }
            report.freed_bytes += disk_usage(&path);
            if !dry_run {
                remove_tree(&path)?;
            }
            report.removed_tmp.push(path);
        }
        Ok(())
    }

    /// Removes leftovers of killed builds/gcs of `base`. The caller holds the
    /// exclusive lock of `base`. Best effort: gc catches anything left.
    fn remove_stale_tmp_of(&self, base: &str) {
        let tmp_root = self.root.join(TMP_DIR);
        let Ok(entries) = fs::read_dir(&tmp_root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if tmp_entry_base(name) == Some(base) {
                let _ = remove_tree(&entry.path());
            }
        }
    }
}

fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_and_names() {
        let k = StoreKey::new("rootfs.ext4", b"material v1");
        assert_eq!(k.hash().len(), HASH_LEN);
        assert_eq!(k.name(), "rootfs.ext4");
        assert_eq!(k.base_name(), format!("{}-rootfs.ext4", k.hash()));
        assert_eq!(k, StoreKey::new("rootfs.ext4", b"material v1"));
        assert_ne!(
            k.hash(),
            StoreKey::new("rootfs.ext4", b"material v2").hash()
        );
        for bad in ["", "a/b", "a b", "..\0", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(
                matches!(
                    StoreKey::try_new(bad, b""),
                    Err(StoreError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
        for good in ["a", "linux-6.1+deb12", "x_y.z", "..", "-"] {
            StoreKey::try_new(good, b"").unwrap();
        }
    }

    #[test]
    #[should_panic(expected = "invalid store key")]
    fn key_new_panics_on_bad_name() {
        StoreKey::new("a/b", b"");
    }

    #[test]
    fn parse_names() {
        let k = StoreKey::new("foo.bar", b"m");
        let base = k.base_name();
        assert_eq!(parse_base(&base), Some((k.hash(), "foo.bar")));
        assert_eq!(parse_base("foo"), None);
        assert_eq!(parse_base(&format!("{}foo", k.hash())), None);
        assert_eq!(
            tmp_entry_base(&format!("{base}.123.AbC9xyz0")),
            Some(base.as_str())
        );
        assert_eq!(
            tmp_entry_base(&format!("{base}.123.0123abcd{DELETING_SUFFIX}")),
            Some(base.as_str())
        );
        assert_eq!(tmp_entry_base(&format!("{base}.x12.abc")), None);
        assert_eq!(tmp_entry_base(&base), None);
        assert_eq!(tmp_entry_base("random-junk"), None);
    }

    #[test]
    fn published_files_are_readable_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let sp = store
            .build(&StoreKey::new("x", b"perm"), |out| {
                fs::write(out.join("f"), b"data")?;
                fs::set_permissions(out.join("f"), fs::Permissions::from_mode(0o200))?;
                fs::create_dir(out.join("d"))?;
                fs::set_permissions(out.join("d"), fs::Permissions::from_mode(0o200))
            })
            .unwrap();
        let mode = |p: &str| fs::metadata(sp.path().join(p)).unwrap().mode() & 0o777;
        assert_eq!(mode("f"), 0o600);
        assert_eq!(mode("d"), 0o700);
    }

    /// Root's and a user's stores never mix (needs root to make files of another uid).
    #[test]
    fn a_path_of_another_uid_is_refused() {
        if euid() != 0 {
            eprintln!("SKIPPED: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let store = Store::open(&root).unwrap();
        // A builder that leaves a file of another user: nothing is published.
        let err = store
            .build(&StoreKey::new("x", b"foreign"), |out| {
                fs::write(out.join("f"), b"")?;
                std::os::unix::fs::chown(out.join("f"), Some(4321), None)
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignFile { .. }), "{err}");
        assert!(store.lookup(&StoreKey::new("x", b"foreign")).is_none());
        // A store path of another user: the store is refused, naming it.
        let sp = store
            .build(&StoreKey::new("y", b"y"), |out| {
                fs::write(out.join("f"), b"")
            })
            .unwrap();
        std::os::unix::fs::chown(sp.path(), Some(4321), None).unwrap();
        let err = check_owner(&root, 0).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&sp.path().display().to_string()), "{text}");
        assert!(
            text.contains("uid 4321") && text.contains("VMRIG_STORE_ALLOW_FOREIGN=1"),
            "{text}"
        );
        // A store of another user, seen by that user: the one foreign thing is root's.
        std::os::unix::fs::chown(&root, Some(4321), None).unwrap();
        let err = check_owner(&root, 4321).unwrap_err().to_string();
        assert!(
            err.contains("belongs to root (uid 0), but vmrig runs as uid 4321"),
            "{err}"
        );
        assert!(err.contains("sudo rm -rf"), "{err}");
    }

    #[test]
    fn error_messages_name_paths() {
        let e = StoreError::Lock {
            path: PathBuf::from("/s/.locks/x.lock"),
            source: io::Error::other("boom"),
        };
        assert_eq!(format!("failed to {e}"), "failed to lock /s/.locks/x.lock");
    }
}
