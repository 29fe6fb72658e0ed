//! Guest images: the builders that turn a node's image inputs into store paths.
//!
//! Three kinds of store path make a bootable node:
//! - `kernel`: Debian's kernel package unpacked (`vmlinuz`, `lib/modules/<version>` with
//!   `depmod` run over it, and the same modules as a read-only disk image, `modules.img`,
//!   that every VM of this kernel mounts);
//! - `initramfs`: the static guest init plus exactly the modules needed to reach the root
//!   disk and the host;
//! - `rootfs`: an ext4 image (`root.img`) made by `mmdebstrap` + `mke2fs -d` with the
//!   node's packages, vmrig's guest bits and the node's `setup` commands; with local
//!   package files, a base tree (`rootfs-base`, cached without them) and a layer that
//!   installs them on it ([`local_debs`]).
//!
//! Per-test configuration (hostname, hosts, users, ...) is not here: see [`node_layer`].

pub mod cpio_writer;
mod error;
pub mod guest_bits;
pub mod initramfs;
pub mod kernel;
pub mod local_debs;
pub mod mirror;
pub mod modules;
pub mod modules_image;
pub mod node_layer;
mod planned;
pub mod rootfs;
mod run;
pub mod tools;
pub mod user_packages;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use error::ImageError;
pub use planned::PlannedImage;
use vmrig_spec::{ImageInputs, TestSpec};
use vmrig_store::remote::RemoteCache;
use vmrig_store::{Store, StorePath};

/// Bumped whenever a builder's output changes for the same inputs, so old store paths are
/// not reused.
pub const BUILDER_VERSION: &str = "vmrig-image-3";

/// The static guest init, built by `build.rs`.
pub const GUEST_INIT: &[u8] = include_bytes!(env!("VMRIG_GUEST_INIT_PATH"));

/// How a build step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Built(Duration),
    Cached,
    /// Fetched (and verified) from the remote cache.
    Fetched(Duration),
}

/// Receives build progress; the CLI renders it (indicatif), tests ignore it.
pub trait BuildObserver: Sync {
    fn step_started(&self, _step: &str) {}
    fn line(&self, _step: &str, _line: &str) {}
    fn step_finished(&self, _step: &str, _outcome: StepOutcome) {}
}

/// An observer that discards everything.
pub struct Quiet;
impl BuildObserver for Quiet {}

/// The store paths that boot one node.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub kernel: StorePath,
    pub initramfs: StorePath,
    pub rootfs: StorePath,
}

impl NodeImage {
    /// The uncompressed kernel when the builder made one (faster to boot), else vmlinuz.
    pub fn kernel_file(&self) -> PathBuf {
        let vmlinux = self.kernel.path().join("vmlinux");
        if vmlinux.exists() {
            vmlinux
        } else {
            self.kernel.path().join("vmlinuz")
        }
    }
    pub fn initrd_file(&self) -> PathBuf {
        self.initramfs.path().join("initrd")
    }
    /// The kernel's modules as a read-only disk image, when the kernel has one (kernels
    /// built before vmrig made them have not: their VMs get no modules disk).
    pub fn modules_image(&self) -> Option<PathBuf> {
        let image = self.kernel.path().join(modules_image::MODULES_IMAGE);
        image.exists().then_some(image)
    }
    pub fn root_image(&self) -> PathBuf {
        self.rootfs.path().join("root.img")
    }
    /// Every store path, for use guards and reports.
    pub fn store_paths(&self) -> [&StorePath; 3] {
        [&self.kernel, &self.initramfs, &self.rootfs]
    }
}

/// Builds (or finds in the store) the images of nodes.
pub struct ImageBuilder<'a> {
    pub store: &'a Store,
    pub observer: &'a dyn BuildObserver,
    /// A mirror URL that overrides the spec and the host's apt sources (`VMRIG_MIRROR`).
    pub mirror_override: Option<String>,
    /// Every path this builder found or built, held in use while the builder lives: a
    /// later step's [`Store::make_room`] (or another process's gc) must not remove the
    /// kernel that the initramfs and root image steps still read.
    pins: std::sync::Mutex<Vec<vmrig_store::UseGuard>>,
    /// A shared cache: missing paths are fetched from it before anything is built, and
    /// what is built is pushed to it (unless it is read-only).
    remote: Option<&'a RemoteCache>,
}

impl<'a> ImageBuilder<'a> {
    pub fn new(store: &'a Store, observer: &'a dyn BuildObserver) -> Self {
        let mirror_override = std::env::var("VMRIG_MIRROR").ok().filter(|m| !m.is_empty());
        ImageBuilder {
            store,
            observer,
            mirror_override,
            pins: Default::default(),
            remote: None,
        }
    }

    /// This builder reading through (and writing back to) `remote`.
    pub fn with_remote(mut self, remote: Option<&'a RemoteCache>) -> Self {
        self.remote = remote;
        self
    }

    /// Checks that the host has every build tool, with one message naming all missing ones.
    pub fn check_tools(&self) -> Result<(), ImageError> {
        let missing = tools::missing(tools::BUILD_TOOLS);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ImageError::MissingTools(tools::missing_message(&missing)))
        }
    }

    /// Images for every node of a test; nodes with equal inputs share one image, and
    /// distinct root images build in parallel.
    pub fn build_test(&self, spec: &TestSpec) -> Result<BTreeMap<String, NodeImage>, ImageError> {
        let mut groups: BTreeMap<String, (ImageInputs, Vec<String>)> = BTreeMap::new();
        for (name, node) in &spec.nodes {
            let inputs = node.image_inputs();
            groups
                .entry(inputs.hash())
                .or_insert_with(|| (inputs, Vec::new()))
                .1
                .push(name.clone());
        }
        let mut kernels = BTreeMap::new();
        for (inputs, _) in groups.values() {
            let key = (inputs.suite.clone(), self.mirror_for(inputs));
            if let std::collections::btree_map::Entry::Vacant(slot) = kernels.entry(key) {
                let built = kernel::build(self, &inputs.suite, slot.key().1.as_deref())?;
                let initramfs = initramfs::build(self, &built)?;
                slot.insert((built, initramfs));
            }
        }
        let results: Vec<Result<(Vec<String>, NodeImage), ImageError>> = std::thread::scope(|s| {
            let handles: Vec<_> = groups
                .values()
                .map(|(inputs, nodes)| {
                    let (kernel, initramfs) =
                        kernels[&(inputs.suite.clone(), self.mirror_for(inputs))].clone();
                    s.spawn(move || {
                        let rootfs = rootfs::build(self, inputs, &kernel, nodes)?;
                        Ok((
                            nodes.clone(),
                            NodeImage {
                                kernel,
                                initramfs,
                                rootfs,
                            },
                        ))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("builder thread panicked"))
                .collect()
        });
        let mut images = BTreeMap::new();
        for result in results {
            let (nodes, image) = result?;
            for node in nodes {
                images.insert(node, image.clone());
            }
        }
        Ok(images)
    }

    /// The mirror for these inputs: `VMRIG_MIRROR`, then the spec's, then the host's.
    pub fn mirror_for(&self, inputs: &ImageInputs) -> Option<String> {
        self.mirror_override
            .clone()
            .or_else(|| inputs.mirror.clone())
            .or_else(|| mirror::host_mirror(&inputs.suite))
    }

    /// Looks `key` up or builds it with `build`, reporting the step to the observer, and
    /// holds the path in use while this builder lives. A path collected between its build
    /// and its pin is built again (bounded: only a gc racing every attempt fails it).
    pub(crate) fn cached_step(
        &self,
        step: &str,
        key: &vmrig_store::StoreKey,
        build: impl Fn(&std::path::Path) -> Result<(), ImageError>,
    ) -> Result<StorePath, ImageError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (path, outcome) = self.find_or_build(step, key, &build)?;
            match self.store.use_path(&path) {
                Ok(guard) => {
                    self.pins.lock().expect("pins lock").push(guard);
                    self.observer.step_finished(step, outcome);
                    return Ok(path);
                }
                Err(vmrig_store::StoreError::Gone { .. }) if attempt < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn find_or_build(
        &self,
        step: &str,
        key: &vmrig_store::StoreKey,
        build: &impl Fn(&std::path::Path) -> Result<(), ImageError>,
    ) -> Result<(StorePath, StepOutcome), ImageError> {
        if let Some(path) = self.store.lookup(key) {
            return Ok((path, StepOutcome::Cached));
        }
        self.observer.step_started(step);
        let start = std::time::Instant::now();
        let room = self.store.make_room()?;
        if !room.removed.is_empty() {
            self.observer
                .line(step, &vmrig_store::describe_room(&room, self.store.root()));
        }
        if let Some(path) = self.fetch(step, key) {
            return Ok((path, StepOutcome::Fetched(start.elapsed())));
        }
        let mut built_here = false;
        let path = self
            .store
            .build(key, |tmp| {
                built_here = true;
                build(tmp)
            })
            .map_err(unwrap_build_error)?;
        let outcome = if built_here {
            self.push(step, &path);
            StepOutcome::Built(start.elapsed())
        } else {
            StepOutcome::Cached
        };
        Ok((path, outcome))
    }

    /// The path from the remote cache, if it has it. A cache that fails (unreachable,
    /// corrupt object) is a warning: the step builds locally.
    fn fetch(&self, step: &str, key: &vmrig_store::StoreKey) -> Option<StorePath> {
        let remote = self.remote?;
        let mut last_report = std::time::Instant::now();
        let mut progress = |bytes: u64| {
            if last_report.elapsed() >= std::time::Duration::from_secs(5) {
                last_report = std::time::Instant::now();
                self.observer
                    .line(step, &format!("fetched {} MiB so far", bytes >> 20));
            }
        };
        match remote.fetch(self.store, key, &mut progress) {
            Ok(Some((path, manifest))) => {
                self.observer.line(
                    step,
                    &format!(
                        "fetched {} ({:.1} MiB) from {}",
                        path.base_name(),
                        manifest.size as f64 / (1 << 20) as f64,
                        remote.url()
                    ),
                );
                Some(path)
            }
            Ok(None) => None,
            Err(e) => {
                self.observer
                    .line(step, &format!("warning: {}; building locally", chain(&e)));
                None
            }
        }
    }

    /// Pushes a path this builder built, when the remote cache is writable. Failing to
    /// push is a warning: the build itself succeeded.
    fn push(&self, step: &str, path: &StorePath) {
        let Some(remote) = self.remote.filter(|r| r.writes()) else {
            return;
        };
        let pushed = self
            .store
            .use_path(path)
            .map_err(vmrig_store::remote::CacheError::from)
            .and_then(|_guard| remote.push(path, &mut |_| {}));
        match pushed {
            Ok(vmrig_store::remote::Pushed::Uploaded { bytes }) => self.observer.line(
                step,
                &format!(
                    "pushed {} ({:.1} MiB) to {}",
                    path.base_name(),
                    bytes as f64 / (1 << 20) as f64,
                    remote.url()
                ),
            ),
            Ok(vmrig_store::remote::Pushed::AlreadyThere) => {}
            Err(e) => self
                .observer
                .line(step, &format!("warning: {}; not pushed", chain(&e))),
        }
    }
}

/// An error with its causes, `a: b: c`, for one-line warnings.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = format!("failed to {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A builder's own error comes back wrapped in the store's; unwrap it so callers see
/// "unknown Debian package ..." rather than "build <store path>".
fn unwrap_build_error(err: vmrig_store::StoreError) -> ImageError {
    match err {
        vmrig_store::StoreError::Build { source, path } => match source.downcast::<ImageError>() {
            Ok(image_error) => *image_error,
            Err(source) => ImageError::Store(vmrig_store::StoreError::Build { path, source }),
        },
        other => ImageError::Store(other),
    }
}

#[cfg(test)]
mod tests {
    use vmrig_store::{FreeSpace, StoreKey};

    use super::*;

    /// A store that collects before every build, as a nearly full disk makes it do.
    fn always_full(dir: &std::path::Path) -> Store {
        Store::open(dir).unwrap().with_free_space(FreeSpace {
            min_free: u64::MAX,
            target_free: u64::MAX,
        })
    }

    #[test]
    fn a_later_step_never_collects_what_an_earlier_step_built() {
        let dir = tempfile::tempdir().unwrap();
        let store = always_full(dir.path());
        let builder = ImageBuilder::new(&store, &Quiet);
        let write = |out: &std::path::Path| -> Result<(), ImageError> {
            std::fs::write(out.join("data"), b"x").map_err(ImageError::io("write"))
        };
        let kernel = builder
            .cached_step("kernel", &StoreKey::new("kernel", b"k"), write)
            .unwrap();
        builder
            .cached_step("initramfs", &StoreKey::new("initramfs", b"i"), write)
            .unwrap();
        assert!(
            kernel.path().join("data").exists(),
            "the kernel was collected"
        );
        drop(builder);
        // Once the builder is gone, its paths are ordinary cache entries again.
        store.make_room().unwrap();
        assert!(!kernel.path().exists());
    }

    /// Records every line and outcome a builder reports.
    #[derive(Default)]
    struct Record(std::sync::Mutex<Vec<String>>);
    impl BuildObserver for Record {
        fn line(&self, step: &str, line: &str) {
            self.0.lock().unwrap().push(format!("{step}: {line}"));
        }
        fn step_finished(&self, step: &str, outcome: StepOutcome) {
            self.0.lock().unwrap().push(format!("{step}: {outcome:?}"));
        }
    }

    fn write_data(out: &std::path::Path) -> Result<(), ImageError> {
        std::fs::write(out.join("data"), b"built").map_err(ImageError::io("write"))
    }

    fn refuse_to_build(_: &std::path::Path) -> Result<(), ImageError> {
        panic!("built although the cache has the path")
    }

    #[test]
    fn an_empty_store_with_a_warm_cache_fetches_and_builds_nothing() {
        let cache_dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", cache_dir.path().display());
        let remote = RemoteCache::open(&url, vmrig_store::remote::CacheMode::ReadWrite).unwrap();
        let key = StoreKey::new("rootfs-bookworm", b"r");

        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = Store::open(a.path()).unwrap();
        let record = Record::default();
        ImageBuilder::new(&first, &record)
            .with_remote(Some(&remote))
            .cached_step("root image", &key, write_data)
            .unwrap();
        let lines = record.0.lock().unwrap().join("\n");
        assert!(lines.contains("pushed"), "{lines}");

        let second = Store::open(b.path()).unwrap();
        let record = Record::default();
        let path = ImageBuilder::new(&second, &record)
            .with_remote(Some(&remote))
            .cached_step("root image", &key, refuse_to_build)
            .unwrap();
        assert_eq!(std::fs::read(path.path().join("data")).unwrap(), b"built");
        let lines = record.0.lock().unwrap().join("\n");
        assert!(lines.contains("root image: Fetched("), "{lines}");
    }

    #[test]
    fn a_corrupt_object_is_a_warning_and_the_step_builds() {
        let cache_dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", cache_dir.path().display());
        let remote = RemoteCache::open(&url, vmrig_store::remote::CacheMode::ReadWrite).unwrap();
        let key = StoreKey::new("kernel-bookworm", b"k");
        let a = tempfile::tempdir().unwrap();
        let first = Store::open(a.path()).unwrap();
        ImageBuilder::new(&first, &Quiet)
            .with_remote(Some(&remote))
            .cached_step("kernel", &key, write_data)
            .unwrap();
        for entry in std::fs::read_dir(cache_dir.path().join("data")).unwrap() {
            std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
        }
        let b = tempfile::tempdir().unwrap();
        let second = Store::open(b.path()).unwrap();
        let record = Record::default();
        let path = ImageBuilder::new(&second, &record)
            .with_remote(Some(&remote))
            .cached_step("kernel", &key, write_data)
            .unwrap();
        assert!(path.path().join("data").exists());
        let lines = record.0.lock().unwrap().join("\n");
        assert!(
            lines.contains("kernel: warning: failed to fetch"),
            "{lines}"
        );
        assert!(lines.contains("corrupt"), "{lines}");
        assert!(lines.contains("building locally"), "{lines}");
        assert!(lines.contains("kernel: Built("), "{lines}");
    }

    #[test]
    fn an_unreachable_cache_is_a_warning_and_a_read_only_one_gets_nothing() {
        let remote = RemoteCache::open(
            "http://127.0.0.1:9/cache",
            vmrig_store::remote::CacheMode::ReadWrite,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = Record::default();
        ImageBuilder::new(&store, &record)
            .with_remote(Some(&remote))
            .cached_step("kernel", &StoreKey::new("kernel", b"k"), write_data)
            .unwrap();
        let lines = record.0.lock().unwrap().join("\n");
        assert!(lines.contains("warning: failed to"), "{lines}");
        assert!(lines.contains("http://127.0.0.1:9/cache"), "{lines}");
        assert!(lines.contains("kernel: Built("), "{lines}");
        // HTTP caches are read-only: nothing is pushed, and no warning about it.
        assert!(!lines.contains("not pushed"), "{lines}");

        let cache_dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", cache_dir.path().display());
        let read_only = RemoteCache::open(&url, vmrig_store::remote::CacheMode::ReadOnly).unwrap();
        ImageBuilder::new(&store, &Quiet)
            .with_remote(Some(&read_only))
            .cached_step("initramfs", &StoreKey::new("initramfs", b"i"), write_data)
            .unwrap();
        assert_eq!(std::fs::read_dir(cache_dir.path()).unwrap().count(), 0);
    }
}
