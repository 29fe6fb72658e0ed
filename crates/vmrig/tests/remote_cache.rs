//! The remote cache against a real S3-compatible server (moto's standalone server, from
//! PyPI into a venv under the target directory, started on 127.0.0.1 by the test), at the
//! store level and through `vmrig store push` / `vmrig cache status`. No VMs.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmrig_store::remote::{CacheError, CacheMode, Manifest, Pushed, RemoteCache};
use vmrig_store::{Store, StoreKey, StorePath};

mod common;

const BUCKET: &str = "vmrig-test";

/// moto's server in a venv of its own (made on first use; `.ci/run` makes it up front).
fn moto_venv() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
    let server = venv.join("bin/moto_server");
    if server.exists() {
        return Some(venv);
    }
    // One maker at a time: parallel test processes share the venv.
    let lock = std::fs::File::create(venv.with_extension("lock")).ok()?;
    // SAFETY: flock on a file we own; the lock is released when `lock` is dropped.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if !server.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "moto[server]"])
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
    }
    Some(venv)
}

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto(venv: &Path) -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let made = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\
             .create_bucket(Bucket='{BUCKET}')",
            moto.endpoint
        ))
        .status()
        .unwrap();
    assert!(made.success(), "create the bucket");
    moto
}

fn s3_env(endpoint: &str) -> [(&'static str, String); 5] {
    [
        ("VMRIG_CACHE_S3_ENDPOINT", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        // No instance metadata lookups on a host without credentials.
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

fn store_at(dir: &Path) -> Store {
    Store::open(dir).unwrap()
}

fn synthetic(store: &Store, name: &str, bytes: &[u8]) -> StorePath {
    store
        .build(&StoreKey::new(name, bytes), |d| {
            std::fs::write(d.join("payload"), bytes)?;
            // A sparse file, as a root image is.
            let f = std::fs::File::create(d.join("root.img"))?;
            f.set_len(256 << 20)?;
            Ok::<_, std::io::Error>(())
        })
        .unwrap()
}

fn push(cache: &RemoteCache, store: &Store, path: &StorePath) -> Pushed {
    let _guard = store.use_path(path).unwrap();
    cache.push(path, &mut |_| {}).unwrap()
}

#[test]
fn s3_cache_end_to_end() {
    let Some(venv) = moto_venv() else {
        vmrig_testkit::cannot_run("python3 -m venv + pip install 'moto[server]' failed");
        return;
    };
    let moto = start_moto(&venv);
    for (k, v) in s3_env(&moto.endpoint) {
        // Safe in edition 2021; this binary's only test reads these.
        std::env::set_var(k, v);
    }
    let url = format!("s3://{BUCKET}/ci/vmrig");
    let tmp = tempfile::tempdir().unwrap();
    let cache = RemoteCache::open(&url, CacheMode::ReadWrite).unwrap();
    cache.check().unwrap();

    // Push from one store, fetch into an empty one: the same bytes, the holes kept.
    let first = store_at(&tmp.path().join("a"));
    let path = synthetic(&first, "rootfs-bookworm", b"root");
    assert!(matches!(push(&cache, &first, &path), Pushed::Uploaded { bytes } if bytes < 1 << 20));
    assert_eq!(push(&cache, &first, &path), Pushed::AlreadyThere);
    let second = store_at(&tmp.path().join("b"));
    let (got, _) = cache
        .fetch(&second, &path.key(), &mut |_| {})
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(got.path().join("payload")).unwrap(), b"root");
    let img = std::fs::metadata(got.path().join("root.img")).unwrap();
    assert_eq!(img.len(), 256 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&img) * 512 < 1 << 20);

    // A truncated object: an error, nothing published.
    let manifest: Manifest = serde_json::from_slice(
        &cache
            .get_small(&format!("{}.json", path.base_name()))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let object = cache.get_small(&manifest.object).unwrap().unwrap();
    cache
        .put_small(&manifest.object, object[..object.len() / 2].to_vec())
        .unwrap();
    let third = store_at(&tmp.path().join("c"));
    let err = cache.fetch(&third, &path.key(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
    assert!(third.lookup(&path.key()).is_none());

    // Two pushes of one path at once (the same key built in two stores).
    let key = StoreKey::new("kernel-bookworm", b"same inputs");
    let x = store_at(&tmp.path().join("x"));
    let y = store_at(&tmp.path().join("y"));
    let px = x
        .build(&key, |d| {
            std::fs::write(d.join("payload"), vec![1u8; 9 << 20])
        })
        .unwrap();
    let py = y
        .build(&key, |d| {
            std::fs::write(d.join("payload"), vec![2u8; 9 << 20])
        })
        .unwrap();
    std::thread::scope(|s| {
        for (store, p) in [(&x, &px), (&y, &py)] {
            let url = url.clone();
            s.spawn(move || {
                let cache = RemoteCache::open(&url, CacheMode::ReadWrite).unwrap();
                let _guard = store.use_path(p).unwrap();
                cache.push(p, &mut |_| {}).unwrap();
            });
        }
    });
    let z = store_at(&tmp.path().join("z"));
    let (got, _) = cache.fetch(&z, &key, &mut |_| {}).unwrap().unwrap();
    let payload = std::fs::read(got.path().join("payload")).unwrap();
    assert!(payload == vec![1u8; 9 << 20] || payload == vec![2u8; 9 << 20]);

    // Read-only: pushes nothing.
    let ro = RemoteCache::open(&url, CacheMode::ReadOnly).unwrap();
    let other = synthetic(&first, "initramfs", b"not pushed");
    let _guard = first.use_path(&other).unwrap();
    assert!(matches!(
        ro.push(&other, &mut |_| {}),
        Err(CacheError::ReadOnly { .. })
    ));
    assert!(ro.manifest(&other.base_name()).unwrap().is_none());

    // The CLI: push the whole store, then status says where each path is.
    let cli_store = tmp.path().join("cli-store");
    let s = store_at(&cli_store);
    let cli_path = synthetic(&s, "rootfs-trixie", b"cli");
    let vmrig = |args: &[&str]| {
        let mut cmd = common::command(tmp.path());
        cmd.args(args)
            .env("VMRIG_STORE", &cli_store)
            .env("VMRIG_CACHE", &url)
            .envs(s3_env(&moto.endpoint));
        cmd.output().unwrap()
    };
    let out = vmrig(&["store", "push"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("pushed {}", cli_path.base_name())),
        "{err}"
    );
    let out = vmrig(&["cache", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("here+cache  {}", cli_path.base_name())),
        "{text}"
    );
    let out = vmrig(&["--cache-mode", "read-only", "store", "push"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
}
