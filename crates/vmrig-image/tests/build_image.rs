//! Builds a real image (kernel, initramfs, root image) with mmdebstrap. Slow (about a
//! minute the first time, then cached in the store); part of the `vm` test group.

use std::sync::Mutex;

use vmrig_image::{BuildObserver, ImageBuilder, StepOutcome};
use vmrig_spec::ImageInputs;
use vmrig_store::Store;

#[derive(Default)]
struct Record(Mutex<Vec<(String, StepOutcome)>>);
impl BuildObserver for Record {
    fn step_finished(&self, step: &str, outcome: StepOutcome) {
        self.0.lock().unwrap().push((step.to_owned(), outcome));
    }
}

fn store() -> Store {
    Store::open_default().expect("store")
}

#[test]
fn builds_a_bootable_image_and_reuses_it() {
    let store = store();
    let record = Record::default();
    let builder = ImageBuilder::new(&store, &record);
    builder.check_tools().unwrap();
    let inputs = ImageInputs {
        suite: "bookworm".into(),
        mirror: None,
        packages: vec!["less".into()],
        setup: vec!["echo built-by-setup > /etc/vmrig-setup-marker".into()],
        ..Default::default()
    };
    let mirror = builder.mirror_for(&inputs);
    let kernel = vmrig_image::kernel::build(&builder, "bookworm", mirror.as_deref()).unwrap();
    let initramfs = vmrig_image::initramfs::build(&builder, &kernel).unwrap();
    let rootfs = vmrig_image::rootfs::build(&builder, &inputs, &kernel, &["test".into()]).unwrap();
    assert!(kernel.path().join("vmlinuz").metadata().unwrap().len() > 1_000_000);
    let initrd = std::fs::read(initramfs.path().join("initrd")).unwrap();
    assert!(initrd.starts_with(b"070701"));
    assert!(initrd.windows(12).any(|w| w == b"virtio_blk.k"));
    let image = rootfs.path().join("root.img");
    // debugfs (e2fsprogs) reads files out of the ext4 image without mounting it.
    let cat = |path: &str| {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat("/etc/vmrig-setup-marker"), "built-by-setup\n");
    assert!(cat("/usr/local/lib/vmrig/backdoor").contains("Spawning backdoor root shell"));
    assert!(!cat("/usr/bin/less").is_empty());
    // The guest bits of a NixOS test guest: no name servers, no getty on the serial line.
    assert!(!cat("/etc/resolv.conf").contains("nameserver"));
    assert!(cat("/etc/systemd/journald.conf.d/vmrig.conf").contains("ForwardToConsole=yes"));
    // The kernel's modules are one image beside the kernel, not in the root image.
    assert!(
        kernel
            .path()
            .join(vmrig_image::modules_image::MODULES_IMAGE)
            .metadata()
            .unwrap()
            .len()
            > 100_000_000
    );
    let ls = std::process::Command::new("debugfs")
        .args(["-R", "ls -p /usr/lib/modules"])
        .arg(&image)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(!listing.contains("-amd64"), "{listing}");

    // A second build of the same inputs is a store hit.
    let again = vmrig_image::rootfs::build(&builder, &inputs, &kernel, &["test".into()]).unwrap();
    assert_eq!(again.path(), rootfs.path());
    let steps = record.0.lock().unwrap();
    assert_eq!(steps.last().unwrap().1, StepOutcome::Cached);
}

#[test]
fn unknown_package_names_the_package_and_node() {
    let store = store();
    let builder = ImageBuilder::new(&store, &vmrig_image::Quiet);
    let inputs = ImageInputs {
        suite: "bookworm".into(),
        mirror: None,
        packages: vec!["vmrig-no-such-package".into()],
        ..Default::default()
    };
    let mirror = builder.mirror_for(&inputs);
    let kernel = vmrig_image::kernel::build(&builder, "bookworm", mirror.as_deref()).unwrap();
    let err =
        vmrig_image::rootfs::build(&builder, &inputs, &kernel, &["server".into()]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "unknown Debian package `vmrig-no-such-package` (asked for by node server)"
        ),
        "{msg}"
    );
}
