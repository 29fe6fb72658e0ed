//! The result cache as `vmrig run` uses it: look a test up from the store's existing
//! images (never building), record a pass.

use vmrig_driver::cache::{cache_key, CacheKey, CachedResult, ResultCache};
use vmrig_image::{ImageBuilder, Quiet};
use vmrig_spec::TestSpec;
use vmrig_store::Store;

/// vmrig's identity in cache keys: its version and its executable (size and mtime), so a
/// rebuilt binary does not reuse the results of another.
pub fn vmrig_identity() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            format!("{}:{}", m.len(), mtime.as_nanos())
        })
        .unwrap_or_default();
    format!("{} {exe}", env!("CARGO_PKG_VERSION"))
}

/// The key of `spec`, if every image it needs is in the store.
pub fn key_of(store: &Store, spec: &TestSpec, identity: &str) -> Option<CacheKey> {
    let builder = ImageBuilder::new(store, &Quiet);
    let images = builder
        .planned(spec)
        .into_iter()
        .map(|(node, planned)| Some((node, planned.complete()?)))
        .collect::<Option<_>>()?;
    cache_key(spec, &images, identity).ok()
}

/// The recorded pass of `spec`, if any.
pub fn lookup(
    store: &Store,
    cache: &ResultCache,
    spec: &TestSpec,
    identity: &str,
) -> Option<CachedResult> {
    cache.lookup(&key_of(store, spec, identity)?)
}

/// Records a pass of `spec` (after the run, when its images are in the store), or forgets
/// an earlier one when it failed.
pub fn record(
    cache: &ResultCache,
    spec: &TestSpec,
    identity: &str,
    outcome: &vmrig_driver::RunOutcome,
) {
    let (passed, elapsed) = (outcome.passed, outcome.elapsed);
    let Ok(key) = cache_key(spec, &outcome.images, identity) else {
        return;
    };
    if passed {
        if let Err(e) = cache.record(&key, &CachedResult::new(spec, elapsed)) {
            eprintln!(
                "vmrig: warning: cannot record the result in {}: {e}",
                cache.dir().display()
            );
        }
    } else {
        cache.forget(&key);
    }
}
