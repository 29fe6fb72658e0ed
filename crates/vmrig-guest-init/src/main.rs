//! vmrig-init: `/init` of every vmrig initramfs (PID 1 until it execs the
//! real init).
//!
//! Steps: mount /dev /proc /sys; load `/etc/vmrig/modules` in order (those the
//! boot needs); wait for the root device; mount it on /newroot (rw, or `ro` +
//! tmpfs overlay); mount the kernel's modules disk (`vmrig.modules=`) read-only on
//! its `/lib/modules/<version>`; copy the per-node layer `/vmrig/layer/**`; move /dev /proc
//! /sys into /newroot and mount the API file systems systemd would mount with
//! processes; run `/etc/vmrig/node-setup.sh` chrooted; switch_root and exec init.
//! A fatal error prints `vmrig-init: error: ...` and powers the machine off.

mod cmdline;
mod layer;
mod log;
mod modules;
mod mount;
mod setup;
mod switch_root;
mod sys;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const MODULES_LIST: &str = "/etc/vmrig/modules";
pub const LAYER_DIR: &str = "/vmrig/layer";
pub const NEWROOT: &str = "/newroot";
const ROOT_WAIT: Duration = Duration::from_secs(15);
const MODULES_WAIT: Duration = Duration::from_secs(15);
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

static SHELL: AtomicBool = AtomicBool::new(false);

/// A fatal error: what failed, the OS error, a hint for the user.
#[derive(Debug)]
pub struct Fatal {
    what: String,
    err: Option<io::Error>,
    hint: String,
}

impl Fatal {
    pub fn new(what: String, err: io::Error, hint: &str) -> Fatal {
        Fatal {
            what,
            err: Some(err),
            hint: hint.to_string(),
        }
    }

    pub fn msg(what: String, hint: &str) -> Fatal {
        Fatal {
            what,
            err: None,
            hint: hint.to_string(),
        }
    }
}

fn fatal(f: Fatal) -> ! {
    log::error(&f.what, f.err.as_ref());
    log::hint(&f.hint);
    if SHELL.load(Ordering::Relaxed) {
        emergency_shell();
    }
    sys::power_off()
}

/// `vmrig.shell`: runs /bin/sh of the initramfs (if any) and waits for it.
fn emergency_shell() {
    if !Path::new("/bin/sh").exists() {
        log::line("vmrig.shell: no /bin/sh in the initramfs");
        return;
    }
    log::line("vmrig.shell: starting /bin/sh; exit it to power off");
    match std::process::Command::new("/bin/sh").status() {
        Ok(_) => {}
        Err(e) => log::error("running /bin/sh", Some(&e)),
    }
}

fn run() -> Result<(), Fatal> {
    mount::early_mounts()?;
    let text = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| Fatal::new("reading /proc/cmdline".into(), e, "is proc mounted?"))?;
    let cfg = cmdline::Cmdline::parse(&text);
    log::set_debug(cfg.debug);
    SHELL.store(cfg.shell, Ordering::Relaxed);
    log::step(&format!("mounted /dev /proc /sys; {cfg:?}"));

    let failed = modules::load_all(Path::new(MODULES_LIST), |name| {
        modules::needed_for_boot(name, cfg.ro)
    });
    log::step(&format!("modules loaded ({failed} failed)"));

    let dev = mount::wait_for_root(&cfg.root, ROOT_WAIT)?;
    let newroot = Path::new(NEWROOT);
    mount::mount_root(&dev, &cfg, newroot)?;
    if let Some(modules) = &cfg.modules {
        // Not fatal: without its modules the guest still boots (modprobe then fails).
        if let Err(f) = mount::mount_modules(modules, newroot, MODULES_WAIT) {
            log::error(&f.what, f.err.as_ref());
            log::hint(&f.hint);
        }
    }

    if Path::new(LAYER_DIR).is_dir() {
        let mut errors = layer::apply(Path::new(LAYER_DIR), newroot);
        let count = errors.len();
        if let Some(last) = errors.pop() {
            for e in &errors {
                log::error(&format!("{} {}", e.what, e.path.display()), Some(&e.err));
            }
            return Err(Fatal::new(
                format!("{} {}", last.what, last.path.display()),
                last.err,
                &format!("applying the per-node layer {LAYER_DIR} failed ({count} errors)"),
            ));
        }
        log::step("applied the per-node layer");
    }

    mount::move_api_mounts(newroot)?;
    mount::systemd_api_mounts(newroot);
    setup::run_node_setup(newroot, SETUP_TIMEOUT);

    let args = std::env::args_os().skip(1).collect();
    Err(switch_root::switch_root(newroot, &cfg.init, args))
}

fn main() {
    log::init_clock();
    std::panic::set_hook(Box::new(|info| {
        log::error(&format!("internal error: {info}"), None);
        log::hint("this is a bug in vmrig-init");
        sys::power_off();
    }));
    if let Err(f) = run() {
        fatal(f);
    }
    fatal(Fatal::msg("init returned".into(), "internal error"));
}
