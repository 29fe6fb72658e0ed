//! Builds `vmrig-guest-init` as a static binary and embeds it into this crate.
//!
//! The guest init must be statically linked (it runs as PID 1 in an initramfs with no
//! libc), which needs `-C target-feature=+crt-static` for the whole crate graph, so it
//! cannot be an ordinary dependency. We run a nested cargo with its own target directory
//! (no lock contention with the outer build) and hand the path to `include_bytes!`.
//! `VMRIG_GUEST_INIT` overrides this with a prebuilt binary.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=VMRIG_GUEST_INIT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let init_crate = manifest.join("../vmrig-guest-init");
    println!(
        "cargo:rerun-if-changed={}",
        init_crate.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        init_crate.join("Cargo.toml").display()
    );

    let binary = match env::var_os("VMRIG_GUEST_INIT") {
        Some(path) => PathBuf::from(path),
        None => build_guest_init(&init_crate),
    };
    println!("cargo:rustc-env=VMRIG_GUEST_INIT_PATH={}", binary.display());
}

fn build_guest_init(init_crate: &std::path::Path) -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out.join("guest-init-target");
    let target = "x86_64-unknown-linux-gnu";
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--target", target])
        .arg("--manifest-path")
        .arg(init_crate.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Small: it is copied into every initramfs.
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_MAKEFLAGS")
        .status()
        .expect("failed to run cargo for vmrig-guest-init");
    assert!(
        status.success(),
        "building the static vmrig-guest-init failed"
    );
    target_dir.join(target).join("release/vmrig-guest-init")
}
