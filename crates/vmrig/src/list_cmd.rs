//! `vmrig list`: tests, their nodes and images (built or not), and cached results. Builds
//! nothing and boots nothing.

use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;
use vmrig_driver::cache::ResultCache;
use vmrig_image::{ImageBuilder, PlannedImage, Quiet};
use vmrig_spec::TestSpec;
use vmrig_store::{Store, StorePath};

use crate::exit;
use crate::units::format_age;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Test files, or directories (every *.toml in them).
    #[arg(required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: ListArgs) -> anyhow::Result<i32> {
    let files = crate::select::expand(&args.files)?;
    let specs = crate::build_cmd::load_specs(&files)?;
    let store = Store::open_default().context("failed to open the image store")?;
    let cache = ResultCache::in_store(store.root());
    let identity = crate::cached::vmrig_identity();
    let builder = ImageBuilder::new(&store, &Quiet);
    let mut out = std::io::stdout().lock();
    for spec in &specs {
        let result = crate::cached::lookup(&store, &cache, spec, &identity)
            .map(|r| {
                format!(
                    "cached (passed {})",
                    format_age(Some(r.passed_at()), SystemTime::now())
                )
            })
            .unwrap_or_else(|| "not cached".to_owned());
        write!(out, "{}", render(spec, &builder.planned(spec), &result))?;
    }
    out.flush()?;
    Ok(exit::OK)
}

/// The listing of one test.
pub fn render(
    spec: &TestSpec,
    planned: &std::collections::BTreeMap<String, PlannedImage>,
    result: &str,
) -> String {
    let show = |p: &Option<StorePath>| match p {
        Some(p) => p.path().display().to_string(),
        None => "not built".to_owned(),
    };
    let mut s = format!("{} ({}): {result}\n", spec.name, spec.path.display());
    for (name, node) in &spec.nodes {
        let written = node.local_debs.iter().map(|d| d.written.clone());
        let packages = node
            .image_inputs()
            .packages
            .into_iter()
            .chain(written)
            .collect::<Vec<_>>()
            .join(" ");
        s.push_str(&format!(
            "  {name}: {} MiB, {} cpu{}, vlans {:?}{}\n",
            node.memory,
            node.cpus,
            if node.cpus == 1 { "" } else { "s" },
            node.vlans,
            if packages.is_empty() {
                String::new()
            } else {
                format!(", packages: {packages}")
            }
        ));
        if let Some(p) = planned.get(name) {
            s.push_str(&format!("    kernel     {}\n", show(&p.kernel)));
            s.push_str(&format!("    initramfs  {}\n", show(&p.initramfs)));
            s.push_str(&format!("    rootfs     {}\n", show(&p.rootfs)));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_listing_of_an_unbuilt_test() {
        let spec = vmrig_spec::parse(
            "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.b]\npackages = [\"curl\"]\ncpus = 2\n[nodes.a]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let none = PlannedImage {
            kernel: None,
            initramfs: None,
            rootfs: None,
        };
        let planned = [("a".to_owned(), none.clone()), ("b".to_owned(), none)].into();
        assert_eq!(
            render(&spec, &planned, "not cached"),
            "\
t (t.toml): not cached
  a: 1024 MiB, 1 cpu, vlans [1]
    kernel     not built
    initramfs  not built
    rootfs     not built
  b: 1024 MiB, 2 cpus, vlans [1], packages: curl
    kernel     not built
    initramfs  not built
    rootfs     not built
"
        );
    }
}
