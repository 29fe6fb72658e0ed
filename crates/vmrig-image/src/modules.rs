//! Kernel module resolution: which `.ko` files an initramfs needs, in load order.
//!
//! Reads the files `depmod` writes (`modules.dep`, `modules.softdep`, `modules.alias`,
//! `modules.builtin`) and resolves hard and soft (`pre:`) dependencies, so the guest init
//! can load modules one by one without a `modprobe`. Soft dependencies matter: ext4 needs
//! crc32c (`softdep ext4 pre: crypto-crc32c`) or the root mount fails.

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The modules a vmrig guest needs to reach its root filesystem and the host.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "ext4",
    "overlay",
    "9p",
    "9pnet_virtio",
];

/// The parsed module index of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// module name -> (relative path, hard dependencies as paths)
    deps: BTreeMap<String, (String, Vec<String>)>,
    /// module name -> soft `pre:` dependencies (names or aliases)
    softdeps: BTreeMap<String, Vec<String>>,
    /// alias -> module names
    aliases: BTreeMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

/// A module that could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("kernel module `{0}` is neither in modules.dep nor built in")]
pub struct UnknownModule(pub String);

/// Normalised module name of a path such as `kernel/fs/ext4/ext4.ko.xz`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Parses the contents of `modules.dep`, `modules.softdep`, `modules.alias`, `modules.builtin`.
    pub fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> ModuleIndex {
        let mut index = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            let deps = rest.split_whitespace().map(str::to_owned).collect();
            index
                .deps
                .insert(module_name(path), (path.to_owned(), deps));
        }
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(name) = words.next() else { continue };
            let mut in_pre = false;
            for word in words {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    w if in_pre => index
                        .softdeps
                        .entry(name.replace('-', "_"))
                        .or_default()
                        .push(w.to_owned()),
                    _ => {}
                }
            }
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(pattern), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                index
                    .aliases
                    .entry(pattern.to_owned())
                    .or_default()
                    .push(module.replace('-', "_"));
            }
        }
        index.builtin = builtin.lines().map(module_name).collect();
        index
    }

    /// Module files (relative paths) to load, dependencies first, for `wanted` modules.
    /// Built-in modules are skipped; an alias expands to every module that provides it
    /// (e.g. `crypto-crc32c` -> crc32c_generic and crc32c_intel; the ones the CPU cannot
    /// use fail to load harmlessly).
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<String>, UnknownModule> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut seen, &mut order, true)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        required: bool,
    ) -> Result<(), UnknownModule> {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some((path, deps)) = self.deps.get(name) else {
            if let Some(providers) = self.aliases.get(name) {
                for provider in providers {
                    self.visit(provider, seen, order, required)?;
                }
                return Ok(());
            }
            return if required {
                Err(UnknownModule(name.to_owned()))
            } else {
                Ok(())
            };
        };
        for soft in self.softdeps.get(name).into_iter().flatten() {
            self.visit(&soft.replace('-', "_"), seen, order, false)?;
            if let Some(providers) = self.aliases.get(soft.as_str()) {
                for provider in providers {
                    self.visit(provider, seen, order, false)?;
                }
            }
        }
        for dep in deps {
            self.visit(&module_name(dep), seen, order, true)?;
        }
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> ModuleIndex {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/modules");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        ModuleIndex::parse(
            &read("modules.dep"),
            &read("modules.softdep"),
            &read("modules.alias"),
            &read("modules.builtin"),
        )
    }

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    fn position(order: &[String], name: &str) -> usize {
        names(order)
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn dependencies_load_before_dependents() {
        let order = fixture().resolve(GUEST_MODULES).unwrap();
        for (before, after) in [
            ("virtio_ring", "virtio"),
            ("virtio", "virtio_pci"),
            ("virtio", "virtio_blk"),
            ("jbd2", "ext4"),
            ("mbcache", "ext4"),
            ("9pnet", "9p"),
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
        ] {
            assert!(
                position(&order, before) < position(&order, after),
                "{before} after {after}: {order:?}"
            );
        }
    }

    #[test]
    fn soft_dependency_through_alias_pulls_crc32c() {
        let order = fixture().resolve(&["ext4"]).unwrap();
        assert!(position(&order, "crc32c_generic") < position(&order, "ext4"));
        assert!(position(&order, "crc32c_intel") < position(&order, "ext4"));
    }

    #[test]
    fn each_module_once() {
        let order = fixture().resolve(GUEST_MODULES).unwrap();
        let unique: BTreeSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_reported() {
        let index = fixture();
        assert_eq!(
            index.resolve(&["crc16_builtin"]).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            index.resolve(&["no_such_module"]),
            Err(UnknownModule("no_such_module".into()))
        );
    }

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(
            module_name("kernel/arch/x86/crypto/crc32c-intel.ko"),
            "crc32c_intel"
        );
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
    }
}
