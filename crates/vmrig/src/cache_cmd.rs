//! The remote cache on the command line: `--cache URL` / `--cache-mode` (global options,
//! also `VMRIG_CACHE` / `VMRIG_CACHE_MODE`), `vmrig store push`, `vmrig store pull` and
//! `vmrig cache status`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use vmrig_image::{initramfs, kernel, rootfs, ImageBuilder, Quiet};
use vmrig_spec::ImageInputs;
use vmrig_store::remote::{CacheMode, Pushed, RemoteCache};
use vmrig_store::{Store, StoreKey, StorePath};

use crate::exit;
use crate::units::format_bytes;

#[derive(Debug, Args)]
pub struct CacheOpts {
    /// A shared cache of store paths: s3://BUCKET/PREFIX (endpoint from
    /// VMRIG_CACHE_S3_ENDPOINT or AWS_ENDPOINT_URL), file:///PATH, http(s)://HOST/PATH
    /// (read-only), gcs://BUCKET/PREFIX, azblob://CONTAINER/PREFIX or ghac://PREFIX.
    /// Credentials come from the provider's usual environment and files, never the URL.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "VMRIG_CACHE",
        hide_env_values = true
    )]
    pub cache: Option<String>,
    /// read-write (default with a cache: push what is built) or read-only (fetch only,
    /// for untrusted jobs such as pull requests).
    #[arg(long, global = true, value_name = "MODE", env = "VMRIG_CACHE_MODE",
          value_parser = parse_mode)]
    pub cache_mode: Option<CacheMode>,
}

fn parse_mode(text: &str) -> Result<CacheMode, String> {
    CacheMode::parse(text).ok_or_else(|| format!("{text:?} is not read-write or read-only"))
}

const UNREACHABLE_FIX: &str = "check the URL, the network, and the credentials in the \
                               provider's environment variables or configuration files";

static REMOTE: OnceLock<Option<Arc<RemoteCache>>> = OnceLock::new();

/// Sets up the cache of the command line (nothing is contacted yet). A bad URL is a
/// usage error, before any work.
pub fn init(opts: &CacheOpts) -> anyhow::Result<()> {
    let remote = match opts.cache.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(url) => Some(Arc::new(RemoteCache::open(
            url,
            opts.cache_mode.unwrap_or(CacheMode::ReadWrite),
        )?)),
    };
    let _ = REMOTE.set(remote);
    Ok(())
}

/// The cache given with `--cache` / `VMRIG_CACHE`, if any.
pub fn remote() -> Option<Arc<RemoteCache>> {
    REMOTE.get().cloned().flatten()
}

fn required(command: &str) -> anyhow::Result<Arc<RemoteCache>> {
    remote().with_context(|| {
        format!(
            "failed to {command}: no cache is set (give --cache URL or set VMRIG_CACHE, e.g. \
             s3://bucket/vmrig or file:///mnt/cache)"
        )
    })
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Show which store paths (of these tests, or of the local store) are here, in the
    /// cache, or missing. Builds and fetches nothing.
    Status {
        /// Test files; none: every path of the local store.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

pub fn run(command: CacheCommand) -> anyhow::Result<i32> {
    match command {
        CacheCommand::Status { files } => status(&files),
    }
}

/// `vmrig store push [FILE...]`: the local store paths of these tests (or all) to the cache.
pub fn push(files: &[PathBuf]) -> anyhow::Result<i32> {
    let remote = required("push")?;
    let store = Store::open_default().context("failed to open the image store")?;
    let paths: Vec<StorePath> = if files.is_empty() {
        store
            .list()?
            .iter()
            .filter_map(|e| StoreKey::from_base_name(&format!("{}-{}", e.hash, e.name)))
            .filter_map(|k| store.lookup(&k))
            .collect()
    } else {
        let mut found = BTreeSet::new();
        for walk in walk_tests(&store, files)? {
            found.extend(walk.into_iter().filter_map(|(_, p)| p.local));
        }
        found
            .into_iter()
            .filter_map(|base| StoreKey::from_base_name(&base))
            .filter_map(|k| store.lookup(&k))
            .collect()
    };
    if paths.is_empty() {
        eprintln!("nothing to push: build the images first (vmrig build FILE...)");
        return Ok(exit::OK);
    }
    let mut failed = 0;
    for path in &paths {
        let bar = transfer_bar(&format!("push {}", path.base_name()));
        let pushed = store
            .use_path(path)
            .map_err(vmrig_store::remote::CacheError::from)
            .and_then(|_guard| remote.push(path, &mut |n| bar.set_position(n)));
        bar.finish_and_clear();
        match pushed {
            Ok(Pushed::Uploaded { bytes }) => eprintln!(
                "pushed {} ({}) to {}",
                path.base_name(),
                format_bytes(bytes),
                remote.url()
            ),
            Ok(Pushed::AlreadyThere) => eprintln!("already in the cache: {}", path.base_name()),
            Err(e) => {
                failed += 1;
                let fix = if e.is_unreachable() {
                    UNREACHABLE_FIX
                } else {
                    ""
                };
                eprintln!(
                    "error: failed to {}{}{fix}",
                    exit::chain_text(&e),
                    if fix.is_empty() { "" } else { ": " }
                );
                if e.is_unreachable() {
                    break;
                }
            }
        }
    }
    Ok(if failed == 0 { exit::OK } else { exit::INFRA })
}

/// `vmrig store pull FILE...`: fetches these tests' images that are not here. Builds nothing.
pub fn pull(files: &[PathBuf]) -> anyhow::Result<i32> {
    let remote = required("pull")?;
    let store = Store::open_default().context("failed to open the image store")?;
    let specs = crate::build_cmd::load_specs(files)?;
    let builder = ImageBuilder::new(&store, &Quiet);
    let mut missing = 0;
    let mut fetch = |key: &StoreKey| -> anyhow::Result<Option<StorePath>> {
        if let Some(path) = store.lookup(key) {
            eprintln!("here: {}", path.base_name());
            return Ok(Some(path));
        }
        let bar = transfer_bar(&format!("pull {}", key.base_name()));
        let fetched = remote.fetch(&store, key, &mut |n| bar.set_position(n));
        bar.finish_and_clear();
        match fetched? {
            Some((path, manifest)) => {
                eprintln!(
                    "fetched {} ({})",
                    path.base_name(),
                    format_bytes(manifest.size)
                );
                Ok(Some(path))
            }
            None => {
                missing += 1;
                eprintln!("not in the cache: {}", key.base_name());
                Ok(None)
            }
        }
    };
    for inputs in distinct_inputs(&specs) {
        let mirror = builder.mirror_for(&inputs);
        let Some(kernel) = fetch(&kernel::key(&inputs.suite, mirror.as_deref()))? else {
            continue;
        };
        fetch(&initramfs::key(&kernel))?;
        fetch(&rootfs::key(&inputs, &kernel)?)?;
    }
    if missing > 0 {
        eprintln!("{missing} path(s) not in the cache: `vmrig build` makes them");
    }
    Ok(exit::OK)
}

fn distinct_inputs(specs: &[vmrig_spec::TestSpec]) -> Vec<ImageInputs> {
    let mut seen = BTreeSet::new();
    specs
        .iter()
        .flat_map(|s| s.nodes.values().map(|n| n.image_inputs()))
        .filter(|i| seen.insert(i.hash()))
        .collect()
}

/// Where one store path is.
struct Place {
    /// The base name when this store has it.
    local: Option<String>,
}

/// Every store path of these tests, by step, with the local base name when it is here;
/// paths whose key needs the kernel (initramfs, root image) are `(step, None)` rows named
/// after the step when the kernel is not here.
fn walk_tests(store: &Store, files: &[PathBuf]) -> anyhow::Result<Vec<Vec<(String, Place)>>> {
    let specs = crate::build_cmd::load_specs(files)?;
    let builder = ImageBuilder::new(store, &Quiet);
    let mut walks = Vec::new();
    for inputs in distinct_inputs(&specs) {
        let mirror = builder.mirror_for(&inputs);
        let kernel_key = kernel::key(&inputs.suite, mirror.as_deref());
        let mut walk = vec![(kernel_key.base_name(), place(store, &kernel_key))];
        if let Some(kernel) = store.lookup(&kernel_key) {
            let key = initramfs::key(&kernel);
            walk.push((key.base_name(), place(store, &key)));
            if let Ok(key) = rootfs::key(&inputs, &kernel) {
                walk.push((key.base_name(), place(store, &key)));
            }
        } else {
            for what in ["initramfs", "rootfs"] {
                walk.push((
                    format!("{what} of {}", kernel_key.base_name()),
                    Place { local: None },
                ));
            }
        }
        walks.push(walk);
    }
    Ok(walks)
}

fn place(store: &Store, key: &StoreKey) -> Place {
    Place {
        local: store.lookup(key).map(|p| p.base_name()),
    }
}

fn status(files: &[PathBuf]) -> anyhow::Result<i32> {
    let remote = required("show the cache's status")?;
    let store = Store::open_default().context("failed to open the image store")?;
    let rows: Vec<(String, bool)> = if files.is_empty() {
        store
            .list()?
            .iter()
            .map(|e| (format!("{}-{}", e.hash, e.name), true))
            .collect()
    } else {
        walk_tests(&store, files)?
            .into_iter()
            .flatten()
            .map(|(name, place)| (name, place.local.is_some()))
            .collect()
    };
    if let Err(e) = remote.check() {
        eprintln!(
            "error: failed to {}: {UNREACHABLE_FIX}",
            exit::chain_text(&e)
        );
        return Ok(exit::INFRA);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "cache {} ({:?})", remote.url(), remote.mode())?;
    for (name, local) in rows {
        let in_cache = if StoreKey::from_base_name(&name).is_some() {
            match remote.manifest(&name) {
                Ok(m) => Some(m.is_some()),
                Err(e) => {
                    eprintln!(
                        "error: failed to {}: {UNREACHABLE_FIX}",
                        exit::chain_text(&e)
                    );
                    return Ok(exit::INFRA);
                }
            }
        } else {
            None // its key needs the kernel, which is not here
        };
        let state = match (local, in_cache) {
            (true, Some(true)) => "here+cache",
            (true, _) => "here",
            (false, Some(true)) => "cache",
            (false, Some(false)) => "missing",
            (false, None) => "unknown",
        };
        writeln!(out, "{state:<11} {name}")?;
    }
    Ok(exit::OK)
}

/// A byte counter on stderr for one transfer (hidden when stderr is not a terminal).
fn transfer_bar(prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.cyan} {prefix:.bold} {bytes} ({binary_bytes_per_sec}) {elapsed}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(prefix.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
