//! The remote cache against the `file://` backend (the S3 tests, against a real
//! S3-compatible server, are in `crates/vmrig/tests/remote_cache.rs`).

use std::fs;

use super::*;

struct Fixture {
    _dirs: Vec<tempfile::TempDir>,
    cache_dir: std::path::PathBuf,
    url: String,
}

fn fixture() -> Fixture {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_owned();
    Fixture {
        url: format!("file://{}", cache_dir.display()),
        cache_dir,
        _dirs: vec![cache],
    }
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn built(store: &Store, name: &str, content: &[u8]) -> StorePath {
    let key = StoreKey::new(name, content);
    store
        .build(&key, |dir| {
            fs::write(dir.join("payload"), content)?;
            Ok::<_, io::Error>(())
        })
        .unwrap()
}

fn push(cache: &RemoteCache, store: &Store, path: &StorePath) -> Pushed {
    let _guard = store.use_path(path).unwrap();
    cache.push(path, &mut |_| {}).unwrap()
}

fn manifest_file(f: &Fixture, path: &StorePath) -> std::path::PathBuf {
    f.cache_dir.join(format!("{}.json", path.base_name()))
}

#[test]
fn a_pushed_path_is_fetched_into_an_empty_store() {
    let f = fixture();
    let cache = RemoteCache::open(&f.url, CacheMode::ReadWrite).unwrap();
    let (_a, first) = store();
    let path = built(&first, "kernel-bookworm", b"vmlinuz");
    assert!(matches!(
        push(&cache, &first, &path),
        Pushed::Uploaded { .. }
    ));
    assert_eq!(push(&cache, &first, &path), Pushed::AlreadyThere);

    let (_b, second) = store();
    let mut seen = 0;
    let (fetched, manifest) = cache
        .fetch(&second, &path.key(), &mut |n| seen = n)
        .unwrap()
        .expect("in the cache");
    assert_eq!(
        fs::read(fetched.path().join("payload")).unwrap(),
        b"vmlinuz"
    );
    assert_eq!(fetched.base_name(), path.base_name());
    assert_eq!(seen, manifest.size);
    assert_eq!(manifest.format, FORMAT);

    let missing = StoreKey::new("kernel-trixie", b"other");
    assert!(cache
        .fetch(&second, &missing, &mut |_| {})
        .unwrap()
        .is_none());
    assert!(second.lookup(&missing).is_none());
}

#[test]
fn a_corrupt_or_truncated_object_is_an_error_and_nothing_is_published() {
    let f = fixture();
    let cache = RemoteCache::open(&f.url, CacheMode::ReadWrite).unwrap();
    let (_a, first) = store();
    let path = built(&first, "rootfs", b"root image bytes");
    push(&cache, &first, &path);
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(manifest_file(&f, &path)).unwrap()).unwrap();
    let object = f.cache_dir.join(&manifest.object);
    let good = fs::read(&object).unwrap();

    let flipped = {
        let mut bytes = good.clone();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        bytes
    };
    let truncated = good[..good.len() - 7].to_vec();
    for bad in [flipped, truncated] {
        fs::write(&object, &bad).unwrap();
        let (_b, second) = store();
        let err = cache.fetch(&second, &path.key(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
        assert!(!err.is_unreachable());
        assert!(second.lookup(&path.key()).is_none());
        assert_eq!(fs::read_dir(second.root().join(".tmp")).unwrap().count(), 0);
    }

    // A manifest that is not JSON, or points out of the prefix, is corrupt too.
    for text in [
        "{ not json",
        r#"{"format":"vmrig-cache-1","base_name":"x","object":"../etc/passwd","size":1,"sha256":"0","unpacked_bytes":1}"#,
    ] {
        fs::write(manifest_file(&f, &path), text).unwrap();
        let (_b, second) = store();
        let err = cache.fetch(&second, &path.key(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
    }
}

#[test]
fn concurrent_pushes_of_one_path_leave_a_valid_entry() {
    let f = fixture();
    let (_a, first) = store();
    let (_b, second) = store();
    // The same path built in two stores (same key, different bytes: real builds are not
    // bit-for-bit reproducible either).
    let key = StoreKey::new("rootfs", b"inputs");
    let one = first
        .build(&key, |d| fs::write(d.join("payload"), vec![1u8; 300_000]))
        .unwrap();
    let two = second
        .build(&key, |d| fs::write(d.join("payload"), vec![2u8; 300_000]))
        .unwrap();
    std::thread::scope(|s| {
        for (store, path) in [(&first, &one), (&second, &two)] {
            let url = f.url.clone();
            s.spawn(move || {
                let cache = RemoteCache::open(&url, CacheMode::ReadWrite).unwrap();
                let _guard = store.use_path(path).unwrap();
                cache.push(path, &mut |_| {}).unwrap();
            });
        }
    });
    let cache = RemoteCache::open(&f.url, CacheMode::ReadWrite).unwrap();
    let (_c, third) = store();
    let (fetched, _) = cache.fetch(&third, &key, &mut |_| {}).unwrap().unwrap();
    let payload = fs::read(fetched.path().join("payload")).unwrap();
    assert!(payload == vec![1u8; 300_000] || payload == vec![2u8; 300_000]);
}

#[test]
fn a_read_only_cache_pushes_nothing() {
    let f = fixture();
    let cache = RemoteCache::open(&f.url, CacheMode::ReadOnly).unwrap();
    assert!(!cache.writes());
    let (_a, first) = store();
    let path = built(&first, "initramfs", b"initrd");
    let _guard = first.use_path(&path).unwrap();
    let err = cache.push(&path, &mut |_| {}).unwrap_err();
    assert!(matches!(err, CacheError::ReadOnly { .. }), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(fs::read_dir(&f.cache_dir).unwrap().count(), 0);
    assert!(cache.put_small("results/x.json", b"{}".to_vec()).is_err());
}

#[test]
fn an_unreachable_cache_is_reported_once_then_skipped() {
    // Nothing listens on port 9 of localhost (discard): connection refused at once.
    let cache = RemoteCache::open("http://127.0.0.1:9/cache", CacheMode::ReadOnly).unwrap();
    let (_a, store) = store();
    let key = StoreKey::new("kernel-bookworm", b"k");
    let start = std::time::Instant::now();
    let err = cache.fetch(&store, &key, &mut |_| {}).unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(
        err.to_string().contains("http://127.0.0.1:9/cache"),
        "{err}"
    );
    let err = cache.fetch(&store, &key, &mut |_| {}).unwrap_err();
    assert!(matches!(err, CacheError::Down { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn small_objects_round_trip() {
    let f = fixture();
    let cache = RemoteCache::open(&f.url, CacheMode::ReadWrite).unwrap();
    assert_eq!(cache.get_small("results/k.json").unwrap(), None);
    cache
        .put_small("results/k.json", b"{\"passed\":true}".to_vec())
        .unwrap();
    assert_eq!(
        cache.get_small("results/k.json").unwrap().unwrap(),
        b"{\"passed\":true}"
    );
}

#[test]
fn from_env_mode_errors_name_the_variable() {
    // Only the parser: the environment is the process's, shared by parallel tests.
    assert_eq!(CacheMode::parse("read-only"), Some(CacheMode::ReadOnly));
    assert_eq!(CacheMode::parse("rw"), Some(CacheMode::ReadWrite));
    assert_eq!(CacheMode::parse("sometimes"), None);
    let err = CacheError::BadMode {
        var: CACHE_MODE_ENV,
        text: "sometimes".into(),
    };
    assert!(err.to_string().contains("VMRIG_CACHE_MODE"));
}
