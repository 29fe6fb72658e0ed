//! `vmrig`: the command line front end over the vmrig library crates.
//!
//! The binary is thin: it parses arguments, calls into `vmrig-spec`, `vmrig-store`,
//! `vmrig-image` (and, for `vmrig run`, the driver), renders progress and errors, and maps
//! the outcome to an exit code.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | ---: | --- |
//! | 0 | success (every test passed, every image built, the store command did its work) |
//! | 1 | a test failed (`vmrig run`) |
//! | 2 | usage error (bad arguments) or an error in a test file (file, line, column and help on stderr) |
//! | 3 | a guest image could not be built (missing host tool, unknown package, a builder failed) |
//! | 4 | infrastructure error (store, QEMU, host resources, anything else) |
//!
//! Errors are classified by looking for a [`vmrig_spec::SpecError`] or a
//! [`vmrig_image::ImageError`] in the error's chain, so `run_cmd` only has to return them
//! (wrapped in `anyhow` with context if it likes) to get codes 2 and 3; a test failure is
//! reported by returning `Ok(1)`.

mod board;
mod build_cmd;
mod cache_cmd;
mod cached;
mod check_cmd;
mod debug_cmd;
mod doctor;
mod exit;
mod jobs;
mod list_cmd;
mod nixos_cmd;
mod progress;
mod run_cmd;
mod runner;
mod select;
mod store_cmd;
mod stubs_cmd;
mod summary;
mod units;

use std::sync::atomic::{AtomicU8, Ordering};

use clap::{Parser, Subcommand};

static VERBOSITY: AtomicU8 = AtomicU8::new(0);

/// How many times `-v` was given (0 when not). For `vmrig run`, whose arguments are its own.
pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

#[derive(Debug, Parser)]
#[command(
    name = "vmrig",
    version,
    about = "Run multi-machine integration tests in QEMU virtual machines",
    long_about = "Run multi-machine integration tests in QEMU virtual machines.\n\n\
        A test is one TOML file that declares named nodes (Debian guests) and a Python test \
        script that drives them, as in the NixOS test framework.",
    after_help = exit::EXIT_CODES_HELP,
    after_long_help = exit::EXIT_CODES_HELP,
    propagate_version = true
)]
struct Cli {
    /// Show more output (every build tool line; more driver detail). Repeat for more.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(flatten)]
    cache: cache_cmd::CacheOpts,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build (or find in the store) the guest images of tests, boot their VMs and run the scripts.
    Run(run_cmd::RunArgs),
    /// Open a Python REPL with a test's machines (the same as `vmrig run -I FILE`).
    Interactive(run_cmd::InteractiveArgs),
    /// Restore a failed run's machines and network from its failure snapshot and open the
    /// Python REPL there (or run `-c CODE`).
    Debug(debug_cmd::DebugArgs),
    /// Build (or find in the store) the guest images of tests without running them.
    Build(build_cmd::BuildArgs),
    /// Show tests, their nodes, their images (built or not) and cached results.
    List(list_cmd::ListArgs),
    /// Check test files and their scripts (syntax, undefined names, unknown methods and
    /// arguments of the API) without building or booting anything; exit 2 on a finding.
    Check(check_cmd::CheckArgs),
    /// Write typed stubs (.pyi) of the test-script API, for editors, mypy and pyright.
    Stubs(stubs_cmd::StubsArgs),
    /// Check that this host has what vmrig needs, and say how to install what is missing.
    Doctor {
        /// The QEMU system emulator to check.
        #[arg(long, default_value = "qemu-system-x86_64", env = "VMRIG_QEMU")]
        qemu: std::path::PathBuf,
        /// The Python interpreter to check.
        #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
        python: std::path::PathBuf,
    },
    /// Run a NixOS VM test on vmrig's driver, with the upstream nixos-test-driver's command
    /// line (vmrig also answers to that name: symlink it as `nixos-test-driver`).
    NixosDriver(nixos_cmd::NixosArgs),
    /// Inspect and clean the image store.
    Store {
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
    /// The shared cache of store paths (--cache URL or VMRIG_CACHE).
    Cache {
        #[command(subcommand)]
        command: cache_cmd::CacheCommand,
    },
}

fn main() {
    // Invoked as the NixOS driver (a symlink named nixos-test-driver): its command line.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    match std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
    {
        Some("nixos-test-driver") => {
            let args = <nixos_cmd::NixosArgs as Parser>::parse();
            std::process::exit(exit::finish(nixos_cmd::run(args)));
        }
        // The other program of upstream's driver package: the script globals for pyflakes.
        Some("generate-driver-symbols") => {
            std::process::exit(exit::finish(nixos_cmd::generate_driver_symbols()))
        }
        _ => {}
    }
    let cli = Cli::parse(); // exits 2 on a usage error, 0 on --help/--version
    VERBOSITY.store(cli.verbose, Ordering::Relaxed);
    if let Err(err) = cache_cmd::init(&cli.cache) {
        std::process::exit(exit::finish(Err(err)));
    }
    let result = match cli.command {
        Command::Run(args) => run_cmd::run(args),
        Command::Interactive(args) => run_cmd::run(args.into()),
        Command::Debug(args) => debug_cmd::run(args),
        Command::Build(args) => build_cmd::run(args),
        Command::List(args) => list_cmd::run(args),
        Command::Check(args) => check_cmd::run(args),
        Command::Stubs(args) => stubs_cmd::run(args),
        Command::Doctor { qemu, python } => doctor::run(qemu, python),
        Command::NixosDriver(args) => nixos_cmd::run(args),
        Command::Store { command } => store_cmd::run(command),
        Command::Cache { command } => cache_cmd::run(command),
    };
    std::process::exit(exit::finish(result));
}
