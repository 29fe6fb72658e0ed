//! The result cache: a passing run recorded under the hash of everything that decided it,
//! so running an unchanged test again can report "cached" without building or booting.
//!
//! # What is in the key
//!
//! - the parsed [`TestSpec`] (every node option, the script text, the global timeout, each
//!   local package file's SHA-256 as the parser read it), with
//!   each file `source` replaced by the SHA-256 of its contents (a directory: of its whole
//!   tree, every entry's path, kind, mode, link target and bytes; [`vmrig_spec::source_digest`]),
//!   and each shared directory's `source` by the digest of its tree;
//! - the store paths (`<hash>-<name>`) of every node's kernel, initramfs and root image;
//! - vmrig's version (the caller passes it; the CLI adds its executable's identity, so a
//!   rebuilt vmrig does not reuse results of the old one).
//!
//! Left out, because they do not change what runs: the test file's path, the script's file
//! name and first line number, and anything the TOML parser drops (comments, key order,
//! formatting outside the script). Moving or reformatting a test keeps its result; editing
//! the script (even its whitespace), an option, a `source` file (or anything in a `source`
//! directory) or an image does not.
//!
//! Records live in `<store>/.results/<key>.json` (the store ignores dot directories); only
//! passing runs are recorded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmrig_image::NodeImage;
use vmrig_spec::TestSpec;

/// Bumped when the key's material or the record's format changes.
const FORMAT: u32 = 1;

/// The directory of result records inside a store.
pub const RESULTS_DIR: &str = ".results";

/// The hash naming a result (64 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key of `spec` run on `images` by vmrig `version`. Reads each file `source` (each
/// directory `source`'s whole tree).
pub fn cache_key(
    spec: &TestSpec,
    images: &BTreeMap<String, NodeImage>,
    version: &str,
) -> std::io::Result<CacheKey> {
    let mut spec_value = serde_json::to_value(spec).map_err(std::io::Error::other)?;
    if let Some(obj) = spec_value.as_object_mut() {
        obj.remove("path");
        if let Some(script) = obj.get_mut("script").and_then(|s| s.as_object_mut()) {
            script.remove("filename");
            script.remove("first_line");
        }
    }
    for (node_name, node) in &spec.nodes {
        for (guest_path, file) in &node.files {
            if let Some(source) = &file.source {
                spec_value["nodes"][node_name]["files"][guest_path]["source"] =
                    serde_json::Value::String(vmrig_spec::source_digest(source)?);
            }
        }
        // What the guest finds in a shared directory decides the run as much as a file does.
        for (name, dir) in &node.shared_dirs {
            spec_value["nodes"][node_name]["shared_dirs"][name]["source"] =
                serde_json::Value::String(vmrig_spec::source_digest(&dir.source)?);
        }
    }
    let images: BTreeMap<&String, Vec<String>> = images
        .iter()
        .map(|(node, image)| {
            let paths = image.store_paths().iter().map(|p| p.base_name()).collect();
            (node, paths)
        })
        .collect();
    let material = serde_json::json!({
        "format": FORMAT,
        "vmrig": version,
        "spec": spec_value,
        "images": images,
    });
    let digest = Sha256::digest(material.to_string().as_bytes());
    Ok(CacheKey(hex::encode(digest)))
}

/// A recorded passing run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedResult {
    pub test: String,
    pub file: String,
    /// When the run passed, seconds since the Unix epoch.
    pub passed_at: u64,
    /// How long the run took, in seconds.
    pub elapsed_secs: f64,
}

impl CachedResult {
    pub fn new(spec: &TestSpec, elapsed: Duration) -> CachedResult {
        CachedResult {
            test: spec.name.clone(),
            file: spec.path.display().to_string(),
            passed_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            elapsed_secs: elapsed.as_secs_f64(),
        }
    }

    pub fn passed_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.passed_at)
    }
}

/// Result records in a directory, one JSON file per key.
#[derive(Debug, Clone)]
pub struct ResultCache {
    dir: PathBuf,
}

impl ResultCache {
    pub fn new(dir: impl Into<PathBuf>) -> ResultCache {
        ResultCache { dir: dir.into() }
    }

    /// The cache kept in the store at `store_root`.
    pub fn in_store(store_root: &Path) -> ResultCache {
        ResultCache::new(store_root.join(RESULTS_DIR))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.0))
    }

    /// The passing result recorded under `key`; None when there is none (or it is unreadable).
    pub fn lookup(&self, key: &CacheKey) -> Option<CachedResult> {
        let text = std::fs::read_to_string(self.file(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records a passing result under `key` (atomically: written aside, then renamed).
    pub fn record(&self, key: &CacheKey, result: &CachedResult) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        let json = serde_json::to_string_pretty(result).map_err(std::io::Error::other)?;
        tmp.write_all(json.as_bytes())?;
        tmp.persist(self.file(key)).map_err(|e| e.error)?;
        Ok(())
    }

    /// Forgets the result under `key` (a failing re-run).
    pub fn forget(&self, key: &CacheKey) {
        let _ = std::fs::remove_file(self.file(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrig_store::{Store, StoreKey};

    fn spec(text: &str) -> TestSpec {
        vmrig_spec::parse(text, Path::new("/tests/t.toml")).unwrap()
    }

    const BASE: &str = "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.a]\nmemory = 512\n";

    fn images(store: &Store, rootfs_material: &str) -> BTreeMap<String, NodeImage> {
        let mk = |name: &str, material: &str| {
            let key = StoreKey::new(name, material.as_bytes());
            store.build(&key, |_| Ok::<(), std::io::Error>(())).unwrap()
        };
        let image = NodeImage {
            kernel: mk("kernel-bookworm", "k"),
            initramfs: mk("initramfs", "i"),
            rootfs: mk("rootfs-bookworm", rootfs_material),
        };
        BTreeMap::from([("a".to_owned(), image)])
    }

    #[test]
    fn the_key_follows_what_decides_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let imgs = images(&store, "r1");
        let key = |text: &str, imgs: &BTreeMap<String, NodeImage>, v: &str| {
            cache_key(&spec(text), imgs, v).unwrap()
        };
        let base = key(BASE, &imgs, "1");
        assert_eq!(base, key(BASE, &imgs, "1"), "stable");
        assert_eq!(base.as_str().len(), 64);

        // Comments and formatting outside the script, and the file's place, do not count.
        let reformatted = format!(
            "# a comment\n{}",
            BASE.replace("memory = 512", "memory=512")
        );
        assert_eq!(base, key(&reformatted, &imgs, "1"));
        let moved = vmrig_spec::parse(BASE, Path::new("/elsewhere/u.toml")).unwrap();
        assert_eq!(base, cache_key(&moved, &imgs, "1").unwrap());

        // The script (even its whitespace), the spec, the images and vmrig's version do.
        assert_ne!(
            base,
            key(&BASE.replace("start_all()", "start_all() "), &imgs, "1")
        );
        assert_ne!(base, key(&BASE.replace("512", "1024"), &imgs, "1"));
        assert_ne!(base, key(BASE, &images(&store, "r2"), "1"));
        assert_ne!(base, key(BASE, &imgs, "2"));
    }

    #[test]
    fn the_key_follows_source_file_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let imgs = images(&store, "r");
        let test = dir.path().join("t.toml");
        std::fs::write(
            &test,
            format!("{BASE}files.\"/etc/x\".source = \"x.txt\"\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("x.txt"), "one").unwrap();
        let first = cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        std::fs::write(dir.path().join("x.txt"), "two").unwrap();
        let second = cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        assert_ne!(first, second);
    }

    /// A rebuilt .deb changes the key by itself (its hash is in the spec), even before its
    /// new image is looked up.
    #[test]
    fn the_key_follows_a_local_packages_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let imgs = images(&store, "r");
        let test = dir.path().join("t.toml");
        std::fs::write(&test, format!("{BASE}packages = [\"./p.deb\"]\n")).unwrap();
        let deb = |body: &str| {
            let member =
                format!("debian-binary   0           0     0     100644  4         `\n2.0\n{body}");
            std::fs::write(dir.path().join("p.deb"), format!("!<arch>\n{member}")).unwrap();
        };
        deb("one");
        let first = cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        deb("two");
        let second = cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        assert_ne!(first, second);
        deb("one");
        let again = cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn the_key_follows_a_shared_directorys_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let imgs = images(&store, "r");
        let test = dir.path().join("t.toml");
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        std::fs::write(
            &test,
            format!("{BASE}shared_dirs.data = {{ source = \"shared\", target = \"/mnt\" }}\n"),
        )
        .unwrap();
        let key = || cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        let first = key();
        std::fs::write(dir.path().join("shared/input"), "one").unwrap();
        assert_ne!(first, key());
    }

    /// A directory `source`: an unchanged tree (even with its files rewritten) keeps the
    /// key; a byte, a mode, a link target or a new empty directory in it changes it.
    #[test]
    fn the_key_follows_a_source_directorys_whole_tree() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let imgs = images(&store, "r");
        let test = dir.path().join("t.toml");
        std::fs::write(
            &test,
            format!("{BASE}files.\"/opt/app\".source = \"app\"\n"),
        )
        .unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("bin")).unwrap();
        std::fs::write(app.join("bin/run"), "#!/bin/sh\n").unwrap();
        std::fs::write(app.join("data.txt"), "one").unwrap();
        symlink("bin/run", app.join("start")).unwrap();
        let key = || cache_key(&vmrig_spec::load(&test).unwrap(), &imgs, "1").unwrap();
        let first = key();
        assert_eq!(first, key(), "stable");

        // Rewriting the same bytes (a new mtime) is no change.
        std::fs::write(app.join("data.txt"), "one").unwrap();
        assert_eq!(first, key());

        let mut seen = vec![first.clone()];
        let mut changed = |what: &str| {
            let k = key();
            assert!(!seen.contains(&k), "{what} did not change the key");
            seen.push(k);
        };
        std::fs::write(app.join("data.txt"), "onf").unwrap();
        changed("one byte");
        std::fs::set_permissions(app.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        changed("a mode");
        std::fs::remove_file(app.join("start")).unwrap();
        symlink("data.txt", app.join("start")).unwrap();
        changed("a link target");
        std::fs::create_dir(app.join("empty")).unwrap();
        changed("an empty directory");
        std::fs::rename(app.join("data.txt"), app.join("data2.txt")).unwrap();
        changed("a name");
    }

    #[test]
    fn records_round_trip_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResultCache::in_store(dir.path());
        let key = CacheKey("ab".repeat(32));
        assert_eq!(cache.lookup(&key), None);
        let result = CachedResult::new(&spec(BASE), Duration::from_millis(1500));
        cache.record(&key, &result).unwrap();
        assert_eq!(cache.lookup(&key), Some(result.clone()));
        assert!(cache.dir().ends_with(RESULTS_DIR));
        assert!(result.passed_at() <= SystemTime::now());
        cache.forget(&key);
        assert_eq!(cache.lookup(&key), None);
    }
}
