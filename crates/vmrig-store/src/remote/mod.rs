//! A shared cache of store paths on object storage (S3 and S3-compatible services, a
//! shared file system, read-only HTTP, GCS, Azure Blob, the GitHub Actions cache), all
//! through Apache OpenDAL.
//!
//! Layout under the URL's prefix:
//!
//! ```text
//! <base>.json                     the manifest: format, object name, size, sha256
//! data/<base>.<nonce>.tar.zst     the store path's directory, tar (sparse) + zstd
//! ```
//!
//! The manifest is written last and names its object, and objects are never overwritten
//! (each upload has its own nonce): a reader sees either no manifest or one whose object
//! is complete. Two runners pushing the same path at once each upload their own object;
//! the last manifest wins and both are valid (the other object is an orphan). What a
//! fetch reads is verified against the manifest's size and sha256 before the store
//! publishes it (through [`Store::build`], so the local store's atomicity holds).
//!
//! Credentials come only from where each provider's SDKs look (environment, config
//! files, instance metadata); URLs are shown redacted ([`redact`]).

pub mod archive;
mod url;

use std::io::{self, BufWriter};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use url::{redact, CacheUrl, URL_FORMS};

use crate::{Store, StoreError, StoreKey, StorePath};

/// The cache URL (`--cache`).
pub const CACHE_ENV: &str = "VMRIG_CACHE";
/// `read-write` or `read-only` (`--cache-mode`).
pub const CACHE_MODE_ENV: &str = "VMRIG_CACHE_MODE";
/// The S3 endpoint of an S3-compatible service; `AWS_ENDPOINT_URL` works too.
pub const S3_ENDPOINT_ENV: &str = "VMRIG_CACHE_S3_ENDPOINT";
/// The manifest format; a manifest of another format counts as absent.
pub const FORMAT: &str = "vmrig-cache-1";

/// Multipart chunk: S3 needs at least 5 MiB per part.
const CHUNK: usize = 8 << 20;
/// Bounds on every remote operation: a cache that does not answer must not hang a run.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether runs write what they built back to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    ReadWrite,
    /// For untrusted jobs (pull requests from forks): fetch, never push.
    ReadOnly,
}

impl CacheMode {
    pub fn parse(text: &str) -> Option<CacheMode> {
        match text {
            "read-write" | "rw" => Some(CacheMode::ReadWrite),
            "read-only" | "ro" => Some(CacheMode::ReadOnly),
            _ => None,
        }
    }
}

/// Errors of the remote cache. Messages read well after "failed to" and name the
/// (redacted) URL.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("use {url:?} as a cache: {reason} (write {URL_FORMS})")]
    BadUrl { url: String, reason: String },
    #[error(
        "read {var}={text:?}: not a cache mode (write read-write, or read-only for jobs that \
         must not write to the cache)"
    )]
    BadMode { var: &'static str, text: String },
    #[error("set up the cache {url}")]
    Open {
        url: String,
        #[source]
        source: opendal::Error,
    },
    #[error("start the cache's I/O threads")]
    Runtime {
        #[source]
        source: io::Error,
    },
    /// The service did not answer or refused (network, credentials, permissions).
    #[error("{action} {object} in the cache {url}")]
    Remote {
        url: String,
        action: &'static str,
        object: String,
        #[source]
        source: io::Error,
    },
    /// An earlier operation found the cache unreachable; later ones do not wait again.
    #[error("reach the cache {url} (it failed earlier in this process)")]
    Down { url: String },
    /// The object does not match its manifest, or does not unpack.
    #[error("fetch {object} from the cache {url}: the object is corrupt ({reason})")]
    Corrupt {
        url: String,
        object: String,
        reason: String,
    },
    #[error("push to the cache {url}: it is read-only ({why})")]
    ReadOnly { url: String, why: &'static str },
    #[error("read {path} to push it")]
    Local {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CacheError {
    /// The cache could not be reached or refused us (as opposed to a corrupt object).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CacheError::Remote { .. } | CacheError::Down { .. })
    }
}

/// A store path's entry in the cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    /// `<hash>-<name>` of the store path.
    pub base_name: String,
    /// The object's name under the prefix.
    pub object: String,
    /// Bytes of the compressed object.
    pub size: u64,
    /// Hex sha256 of the compressed object.
    pub sha256: String,
    /// Bytes of the store path on disk when it was pushed (allocated, holes excluded).
    pub unpacked_bytes: u64,
}

/// What [`RemoteCache::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Uploaded { bytes: u64 },
    AlreadyThere,
}

/// A remote cache of store paths.
pub struct RemoteCache {
    shown: String,
    url: CacheUrl,
    mode: CacheMode,
    // Fields drop in order: the operator before the runtime it runs on.
    op: opendal::blocking::Operator,
    _runtime: tokio::runtime::Runtime,
    down: AtomicBool,
}

impl std::fmt::Debug for RemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCache")
            .field("url", &self.shown)
            .field("mode", &self.mode)
            .finish()
    }
}

impl RemoteCache {
    /// The cache named by `VMRIG_CACHE` (none when unset or empty), in the mode of
    /// `VMRIG_CACHE_MODE` (default read-write).
    pub fn from_env() -> Result<Option<RemoteCache>, CacheError> {
        let Some(url) = std::env::var(CACHE_ENV).ok().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        RemoteCache::open(&url, mode_from_env()?).map(Some)
    }

    /// Sets up the cache at `url` (nothing is contacted yet: an unreachable cache shows
    /// at the first operation).
    pub fn open(url: &str, mode: CacheMode) -> Result<RemoteCache, CacheError> {
        let parsed = CacheUrl::parse(url)?;
        let shown = redact(url);
        // reqwest is built without a default TLS provider (ring instead of aws-lc: a much
        // shorter build); a second install (another cache in this process) is harmless.
        // (ring's provider is deprecated only for lacking post-quantum key exchange.)
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Without OpenDAL's default transport feature (it would bring aws-lc), its HTTP
        // services need a transport installed by hand; the first install wins.
        opendal::HttpTransporter::install_default(
            opendal_http_transport_reqwest::ReqwestTransport::default(),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmrig-cache")
            .enable_all()
            .build()
            .map_err(|source| CacheError::Runtime { source })?;
        let op = {
            let _entered = runtime.enter();
            operator(&parsed).and_then(opendal::blocking::Operator::new)
        }
        .map_err(|source| CacheError::Open {
            url: shown.clone(),
            source,
        })?;
        Ok(RemoteCache {
            shown,
            url: parsed,
            mode,
            op,
            _runtime: runtime,
            down: AtomicBool::new(false),
        })
    }

    /// The URL, redacted for display.
    pub fn url(&self) -> &str {
        &self.shown
    }

    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    /// Whether runs should push what they build.
    pub fn writes(&self) -> bool {
        self.mode == CacheMode::ReadWrite && self.url.writable()
    }

    fn remote_err(&self, action: &'static str, object: &str, e: opendal::Error) -> CacheError {
        if !matches!(e.kind(), opendal::ErrorKind::NotFound) {
            self.down.store(true, Ordering::Relaxed);
        }
        CacheError::Remote {
            url: self.shown.clone(),
            action,
            object: object.to_owned(),
            source: io::Error::other(e),
        }
    }

    fn check_up(&self) -> Result<(), CacheError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(CacheError::Down {
                url: self.shown.clone(),
            });
        }
        Ok(())
    }

    /// The manifest of `base`, `None` if the cache has none (or one of another format).
    pub fn manifest(&self, base: &str) -> Result<Option<Manifest>, CacheError> {
        self.check_up()?;
        let name = format!("{base}.json");
        let bytes = match self.op.read(&name) {
            Ok(buf) => buf.to_vec(),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.remote_err("read", &name, e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CacheError::Corrupt {
                url: self.shown.clone(),
                object: name.clone(),
                reason: format!("not a manifest: {e}"),
            })?;
        if manifest.format != FORMAT {
            return Ok(None);
        }
        if manifest.base_name != base || !valid_object_name(&manifest.object) {
            return Err(CacheError::Corrupt {
                url: self.shown.clone(),
                object: name,
                reason: format!("it names {:?}", manifest.object),
            });
        }
        Ok(Some(manifest))
    }

    /// Fetches `key` into `store` when the cache has it: downloads, unpacks and verifies
    /// in one stream inside [`Store::build`], so nothing unverified is ever published.
    /// `Ok(None)`: the cache has no such path. `progress` gets compressed bytes so far.
    pub fn fetch(
        &self,
        store: &Store,
        key: &StoreKey,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<(StorePath, Manifest)>, CacheError> {
        let base = key.base_name();
        let Some(manifest) = self.manifest(&base)? else {
            return Ok(None);
        };
        let built = store.build(key, |dir| self.fetch_into(&manifest, dir, progress));
        match built {
            Ok(path) => Ok(Some((path, manifest))),
            Err(StoreError::Build { source, path }) => match source.downcast::<CacheError>() {
                Ok(e) => Err(*e),
                Err(source) => Err(StoreError::Build { path, source }.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn fetch_into(
        &self,
        manifest: &Manifest,
        dir: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), CacheError> {
        let object = &manifest.object;
        let reader = self
            .op
            .reader(object)
            .and_then(|r| r.into_std_read(..))
            .map_err(|e| self.remote_err("read", object, e))?;
        let corrupt = |reason: String| CacheError::Corrupt {
            url: self.shown.clone(),
            object: object.clone(),
            reason,
        };
        let hashing =
            archive::Hashing::new(io::BufReader::with_capacity(1 << 20, reader), progress);
        let hashing = archive::unpack(hashing, dir).map_err(|e| {
            // A transport error surfaces as an I/O error of the reader: tell it apart
            // from a bad stream by opendal's error inside.
            if e.get_ref()
                .is_some_and(|inner| inner.is::<opendal::Error>())
            {
                self.down.store(true, Ordering::Relaxed);
                CacheError::Remote {
                    url: self.shown.clone(),
                    action: "read",
                    object: object.clone(),
                    source: e,
                }
            } else {
                corrupt(format!("it does not unpack: {e}"))
            }
        })?;
        let (_, size, sha256) = hashing.finish();
        if size != manifest.size || sha256 != manifest.sha256 {
            return Err(corrupt(format!(
                "{size} bytes with sha256 {sha256}, the manifest says {} bytes with sha256 {}",
                manifest.size, manifest.sha256
            )));
        }
        Ok(())
    }

    /// Pushes a store path (the caller holds it in use) unless the cache has it.
    pub fn push(
        &self,
        path: &StorePath,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Pushed, CacheError> {
        if self.mode == CacheMode::ReadOnly {
            return Err(CacheError::ReadOnly {
                url: self.shown.clone(),
                why: "--cache-mode read-only",
            });
        }
        if !self.url.writable() {
            return Err(CacheError::ReadOnly {
                url: self.shown.clone(),
                why: "HTTP caches are read-only",
            });
        }
        let base = path.base_name();
        if self.manifest(&base)?.is_some() {
            return Ok(Pushed::AlreadyThere);
        }
        let object = format!("data/{base}.{}.tar.zst", nonce());
        let (size, sha256) = match self.upload(path.path(), &object, progress) {
            Ok(done) => done,
            Err(e) => {
                // Best effort: a partial object is invisible (no manifest names it) but
                // takes space.
                let _ = self.op.delete(&object);
                return Err(e);
            }
        };
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            base_name: base.clone(),
            object,
            size,
            sha256,
            unpacked_bytes: crate::disk_usage(path.path()),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        let name = format!("{base}.json");
        self.op
            .write(&name, json)
            .map_err(|e| self.remote_err("write", &name, e))?;
        Ok(Pushed::Uploaded { bytes: size })
    }

    fn upload(
        &self,
        dir: &Path,
        object: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(u64, String), CacheError> {
        let opts = opendal::options::WriteOptions {
            chunk: Some(CHUNK),
            concurrent: 2,
            ..Default::default()
        };
        let writer = self
            .op
            .writer_options(object, opts)
            .map_err(|e| self.remote_err("write", object, e))?
            .into_std_write();
        let hashing = archive::Hashing::new(BufWriter::with_capacity(CHUNK, writer), progress);
        let io_err = |e: io::Error| {
            if e.get_ref()
                .is_some_and(|inner| inner.is::<opendal::Error>())
            {
                self.down.store(true, Ordering::Relaxed);
                CacheError::Remote {
                    url: self.shown.clone(),
                    action: "write",
                    object: object.to_owned(),
                    source: e,
                }
            } else {
                CacheError::Local {
                    path: dir.to_owned(),
                    source: e,
                }
            }
        };
        let hashing = archive::pack(dir, hashing).map_err(io_err)?;
        let (buffered, size, sha256) = hashing.finish();
        let mut writer = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        writer.close().map_err(io_err)?;
        Ok((size, sha256))
    }

    /// Checks that the cache answers (a listing of its prefix, or a read of a name that
    /// does not exist for services that cannot list).
    pub fn check(&self) -> Result<(), CacheError> {
        match self.op.stat("vmrig-cache-probe") {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.remote_err("reach", "the prefix", e)),
        }
    }

    /// A small object (result records), `None` if absent.
    pub fn get_small(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.check_up()?;
        match self.op.read(name) {
            Ok(buf) => Ok(Some(buf.to_vec())),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.remote_err("read", name, e)),
        }
    }

    /// Writes a small object in one request (atomic on every supported service).
    pub fn put_small(&self, name: &str, bytes: Vec<u8>) -> Result<(), CacheError> {
        self.check_up()?;
        if !self.writes() {
            return Err(CacheError::ReadOnly {
                url: self.shown.clone(),
                why: "--cache-mode read-only",
            });
        }
        self.op
            .write(name, bytes)
            .map(|_| ())
            .map_err(|e| self.remote_err("write", name, e))
    }
}

/// `VMRIG_CACHE_MODE`, default read-write.
pub fn mode_from_env() -> Result<CacheMode, CacheError> {
    match std::env::var(CACHE_MODE_ENV) {
        Ok(text) if !text.is_empty() => CacheMode::parse(&text).ok_or(CacheError::BadMode {
            var: CACHE_MODE_ENV,
            text,
        }),
        _ => Ok(CacheMode::ReadWrite),
    }
}

/// An object name a manifest may point at: under `data/`, no way out of the prefix.
fn valid_object_name(name: &str) -> bool {
    name.strip_prefix("data/").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    })
}

/// Unique per upload, so that concurrent pushers never write the same object.
fn nonce() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let material = format!(
        "{}-{}-{}-{:?}",
        std::process::id(),
        now.as_nanos(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::thread::current().id()
    );
    hex::encode(Sha256::digest(material.as_bytes()))[..16].to_owned()
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The OpenDAL operator for `url`, with timeouts and retries on every operation.
fn operator(url: &CacheUrl) -> opendal::Result<opendal::Operator> {
    use opendal::services;
    let root = |prefix: &str| format!("/{prefix}");
    let builder = match url {
        CacheUrl::S3 { bucket, prefix } => {
            let mut b = services::S3::default().bucket(bucket).root(&root(prefix));
            if let Some(endpoint) = env(S3_ENDPOINT_ENV).or_else(|| env("AWS_ENDPOINT_URL")) {
                b = b.endpoint(&endpoint);
            }
            // S3-compatible services mostly ignore the region, but signing needs one.
            let region = env("AWS_REGION")
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".to_owned());
            opendal::Operator::new(b.region(&region))
        }
        CacheUrl::File { path } => opendal::Operator::new(services::Fs::default().root(path)),
        CacheUrl::Http { endpoint, prefix } => opendal::Operator::new(
            services::Http::default()
                .endpoint(endpoint)
                .root(&root(prefix)),
        ),
        CacheUrl::Gcs { bucket, prefix } => {
            opendal::Operator::new(services::Gcs::default().bucket(bucket).root(&root(prefix)))
        }
        CacheUrl::Azblob { container, prefix } => {
            let mut b = services::Azblob::default()
                .container(container)
                .root(&root(prefix));
            if let Some(account) =
                env("AZURE_STORAGE_ACCOUNT_NAME").or_else(|| env("AZURE_STORAGE_ACCOUNT"))
            {
                b = b
                    .account_name(&account)
                    .endpoint(&format!("https://{account}.blob.core.windows.net"));
            }
            if let Some(endpoint) = env("AZURE_STORAGE_ENDPOINT") {
                b = b.endpoint(&endpoint);
            }
            if let Some(key) = env("AZURE_STORAGE_ACCOUNT_KEY").or_else(|| env("AZURE_STORAGE_KEY"))
            {
                b = b.account_key(&key);
            }
            opendal::Operator::new(b)
        }
        CacheUrl::Ghac { prefix } => {
            opendal::Operator::new(services::Ghac::default().root(&root(prefix)))
        }
    }?;
    Ok(builder
        .layer(
            opendal::layers::TimeoutLayer::new()
                .with_timeout(OP_TIMEOUT)
                .with_io_timeout(IO_TIMEOUT),
        )
        .layer(
            opendal::layers::RetryLayer::new()
                .with_max_times(2)
                .with_min_delay(Duration::from_millis(200))
                .with_jitter(),
        ))
}

#[cfg(test)]
mod tests;
