//! `vmrig build`: the guest images of tests, built into the store (or found there).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use vmrig_image::{ImageBuilder, NodeImage};
use vmrig_spec::TestSpec;
use vmrig_store::Store;

use crate::exit::{self, Reported};
use crate::progress::Progress;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Test files whose images to build.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Print the store paths as one JSON object on stdout (and nothing else there):
    /// {"tests":[{"name":…,"file":…,"nodes":{"<node>":{"kernel":…,"initrd":…,"rootfs":…}}}]}
    #[arg(long)]
    pub json: bool,

    /// Also write a NixOS-style start script `run-<node>-vm` per node into DIR (with each
    /// node's initrd), for `vmrig nixos-driver` or the upstream NixOS test driver. VLANs join
    /// the switches named by QEMU_VDE_SOCKET_<n>; QEMU_OPTS, QEMU_NET_OPTS,
    /// QEMU_KERNEL_PARAMS, NIX_DISK_IMAGE and extra arguments are honoured.
    #[arg(long, value_name = "DIR")]
    pub start_scripts: Option<PathBuf>,
}

pub fn run(args: BuildArgs) -> anyhow::Result<i32> {
    // SIGINT/SIGTERM: say so and exit 130/143; build tools die with the process.
    vmrig_driver::cleanup::install_signal_handlers();
    let specs = load_specs(&args.files)?;
    let store = Store::open_default().context("failed to open the image store")?;
    let progress = Progress::new(crate::verbosity() > 0);
    let mut built = Vec::new();
    {
        let remote = crate::cache_cmd::remote();
        let builder = ImageBuilder::new(&store, &progress).with_remote(remote.as_deref());
        builder.check_tools()?;
        for spec in &specs {
            let images = builder.build_test(spec).map_err(|err| {
                progress.fail_unfinished();
                let context = match crate::runner::unknown_package_place(spec, &err) {
                    Some(at) => format!("{at}: failed to build the images of test `{}`", spec.name),
                    None => format!(
                        "failed to build the images of test `{}` ({})",
                        spec.name,
                        spec.path.display()
                    ),
                };
                anyhow::Error::new(err).context(context)
            })?;
            built.push((spec, images));
        }
    }
    drop(progress);

    if let Some(dir) = &args.start_scripts {
        let accel = vmrig_vm::accel::decide(vmrig_vm::accel::AccelChoice::Auto)?.accel;
        for (spec, images) in &built {
            for script in vmrig_driver::nixos::write_start_scripts(spec, images, dir, accel)? {
                eprintln!("wrote {}", script.display());
            }
        }
    }

    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", to_json(&built))?;
    } else {
        for (spec, images) in &built {
            write_summary(&mut out, spec, images)?;
        }
    }
    out.flush()?;
    Ok(exit::OK)
}

/// Loads every test file; shows every spec error (not only the first file's) and fails
/// with exit code 2 if there was any.
pub fn load_specs(files: &[PathBuf]) -> anyhow::Result<Vec<TestSpec>> {
    let mut specs = Vec::new();
    let mut failed = false;
    for file in files {
        match vmrig_spec::load(file) {
            Ok(spec) => specs.push(spec),
            Err(err) => {
                exit::show_spec_error(&err);
                failed = true;
            }
        }
    }
    if failed {
        return Err(Reported(exit::USAGE).into());
    }
    Ok(specs)
}

fn write_summary(
    out: &mut impl Write,
    spec: &TestSpec,
    images: &BTreeMap<String, NodeImage>,
) -> std::io::Result<()> {
    writeln!(out, "{} ({})", spec.name, spec.path.display())?;
    for (node, image) in images {
        writeln!(out, "  {node}")?;
        writeln!(out, "    kernel  {}", image.kernel_file().display())?;
        writeln!(out, "    initrd  {}", image.initrd_file().display())?;
        writeln!(out, "    rootfs  {}", image.root_image().display())?;
    }
    Ok(())
}

fn to_json(built: &[(&TestSpec, BTreeMap<String, NodeImage>)]) -> serde_json::Value {
    let path = |p: &Path| serde_json::Value::String(p.display().to_string());
    let tests: Vec<serde_json::Value> = built
        .iter()
        .map(|(spec, images)| {
            let nodes: serde_json::Map<String, serde_json::Value> = images
                .iter()
                .map(|(node, image)| {
                    (
                        node.clone(),
                        serde_json::json!({
                            "kernel": path(&image.kernel_file()),
                            "initrd": path(&image.initrd_file()),
                            "rootfs": path(&image.root_image()),
                        }),
                    )
                })
                .collect();
            serde_json::json!({
                "name": spec.name,
                "file": path(&spec.path),
                "nodes": nodes,
            })
        })
        .collect();
    serde_json::json!({ "tests": tests })
}
