//! The store paths a test's images would have, found without building anything
//! (`vmrig list`, the result cache).
//!
//! The keys are the builders' own (`kernel::key`, `initramfs::key`, `rootfs::key`). The
//! initramfs and root image keys name the kernel, so they count as "not built" while their
//! kernel is not built.

use std::collections::BTreeMap;

use vmrig_spec::{ImageInputs, TestSpec};
use vmrig_store::StorePath;

use crate::{initramfs, kernel, rootfs, ImageBuilder, NodeImage};

/// One node's store paths, each `None` while it is not in the store (or, for the root
/// image, while its key cannot be known because the kernel is not built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedImage {
    pub kernel: Option<StorePath>,
    pub initramfs: Option<StorePath>,
    pub rootfs: Option<StorePath>,
}

impl PlannedImage {
    /// The bootable image, when every path is in the store.
    pub fn complete(&self) -> Option<NodeImage> {
        Some(NodeImage {
            kernel: self.kernel.clone()?,
            initramfs: self.initramfs.clone()?,
            rootfs: self.rootfs.clone()?,
        })
    }
}

impl ImageBuilder<'_> {
    /// Looks up (never builds) the store paths of every node of `spec`.
    /// A kernel path without a readable `version` counts as having no root image.
    pub fn planned(&self, spec: &TestSpec) -> BTreeMap<String, PlannedImage> {
        spec.nodes
            .iter()
            .map(|(name, node)| (name.clone(), self.planned_node(&node.image_inputs())))
            .collect()
    }

    fn planned_node(&self, inputs: &ImageInputs) -> PlannedImage {
        let mirror = self.mirror_for(inputs);
        let kernel = self
            .store
            .lookup(&kernel::key(&inputs.suite, mirror.as_deref()));
        let initramfs = kernel
            .as_ref()
            .and_then(|k| self.store.lookup(&initramfs::key(k)));
        let rootfs = kernel
            .as_ref()
            .and_then(|k| rootfs::key(inputs, k).ok())
            .and_then(|key| self.store.lookup(&key));
        PlannedImage {
            kernel,
            initramfs,
            rootfs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_one_node() -> TestSpec {
        vmrig_spec::parse(
            "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.a]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn nothing_is_planned_in_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = vmrig_store::Store::open(dir.path()).unwrap();
        let spec = spec_with_one_node();
        let mut builder = ImageBuilder::new(&store, &crate::Quiet);
        builder.mirror_override = Some("file:///srv/debian-mirror".into());
        let planned = builder.planned(&spec);
        assert_eq!(planned["a"].kernel, None);
        assert_eq!(planned["a"].rootfs, None);
        assert!(planned["a"].complete().is_none());
    }

    #[test]
    fn a_kernel_in_the_store_is_found_by_the_builders_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = vmrig_store::Store::open(dir.path()).unwrap();
        let key = kernel::key(vmrig_spec::DEFAULT_SUITE, Some("file:///srv/debian-mirror"));
        store
            .build(&key, |_tmp| Ok::<(), std::io::Error>(()))
            .unwrap();
        let mut builder = ImageBuilder::new(&store, &crate::Quiet);
        builder.mirror_override = Some("file:///srv/debian-mirror".into());
        let inputs = spec_with_one_node().nodes["a"].image_inputs();
        let planned = builder.planned_node(&inputs);
        assert_eq!(
            planned.kernel.as_ref().map(|k| k.name()),
            Some(format!("kernel-{}", vmrig_spec::DEFAULT_SUITE).as_str())
        );
        // The kernel has no `version` file: its root image's key cannot be made.
        assert_eq!(planned.rootfs, None);
    }
}
