//! [`RunError`]: why a run could not take place, one variant per thing that failed, and
//! [`ErrorKind`], what a caller decides on (the CLI's exit code, whether a disk is full).
//! Kinds come from the variants and from the causes' `io::ErrorKind`s, never from text.

use std::error::Error as StdError;
use std::io;
use std::path::{Path, PathBuf};

use vmrig_image::ImageError;
use vmrig_python::{BridgeError, ScriptError};
use vmrig_spec::SpecError;
use vmrig_store::{DiskFull, StoreError};

/// Why a run could not take place (as opposed to a test that ran and failed). Each message
/// is one line that says what to do; an I/O cause is also the error's `source`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The script does not compile, its static check found mistakes, or Python could not
    /// check it.
    #[error("{0}")]
    Script(ScriptError),
    /// The script's Python: missing, too old, or its connection to vmrig failed.
    #[error("{0}")]
    Python(BridgeError),
    /// A guest image could not be built.
    #[error(transparent)]
    Image(ImageError),
    #[error(
        "`{}` not found: install QEMU (`sudo apt-get install qemu-system-x86 qemu-utils`) \
         or name another with `--qemu PATH` (or VMRIG_QEMU)",
        .qemu.display()
    )]
    QemuNotFound { qemu: PathBuf },
    #[error("`qemu-img` not found; install it with `sudo apt-get install qemu-utils`")]
    QemuImgNotFound,
    /// `<qemu> --version` could not run.
    #[error(
        "cannot run `{} --version`: {source}; name an executable QEMU with `--qemu PATH` \
         (or VMRIG_QEMU)",
        .qemu.display()
    )]
    QemuUnrunnable {
        qemu: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is QEMU {}.{}, too old: vmrig needs QEMU {}.{} or newer (for `-netdev stream`): \
         install a newer qemu-system-x86 or name another with `--qemu PATH` (or VMRIG_QEMU)",
        .qemu.display(), .found.0, .found.1, .needed.0, .needed.1
    )]
    QemuTooOld {
        qemu: PathBuf,
        found: (u32, u32),
        needed: (u32, u32),
    },
    /// `<qemu> --version` printed no QEMU version.
    #[error(
        "`{} --version` did not print a QEMU version (it printed {printed:?}): name the QEMU \
         system emulator with `--qemu PATH` (or VMRIG_QEMU)",
        .qemu.display()
    )]
    NotQemu { qemu: PathBuf, printed: String },
    /// `--accel kvm` on a host where KVM cannot be used.
    #[error(transparent)]
    Accel(#[from] vmrig_vm::accel::KvmUnusable),
    #[error("opening the store: {0}")]
    StoreOpen(#[source] StoreError),
    /// A built image could not be marked in use.
    #[error(transparent)]
    HoldImage(StoreError),
    #[error(
        "cannot create the output directory {}: {source}; choose another with `-o DIR`",
        .dir.display()
    )]
    OutputDirCreate {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write to the output directory {}: {source}; choose another with `-o DIR`",
        .dir.display()
    )]
    OutputDirWrite {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The run directory (sockets, disks) could not be made in `dir`.
    #[error("creating a run directory: {source}")]
    RunDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the switch of VLAN {vlan}: {source}")]
    Switch {
        vlan: u8,
        #[source]
        source: vmrig_net::NetError,
    },
    #[error("capturing VLAN {vlan} to {}: {source}", .path.display())]
    Capture {
        vlan: u8,
        path: PathBuf,
        #[source]
        source: vmrig_net::NetError,
    },
    #[error("adding `{node}` to VLAN {vlan}: {source}")]
    AddPort {
        node: String,
        vlan: u8,
        #[source]
        source: vmrig_net::NetError,
    },
    /// A node's per-test layer (its files, units, users) could not be made.
    #[error("node `{node}`: {source}")]
    NodeLayer {
        node: String,
        #[source]
        source: io::Error,
    },
    /// A machine from a start command could not be made.
    #[error(transparent)]
    CreateMachine(crate::ApiError),
    #[error("two machines are named `{name}`: name them with --vm-names")]
    DuplicateMachine { name: String },
    #[error("cannot read the test script {}: {source}", .path.display())]
    ReadScript {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A failure snapshot that cannot be saved or restored here (`vmrig debug`).
    #[error(transparent)]
    FailureSnapshot(#[from] crate::failure::FailureError),
    /// A machine of a failure snapshot did not come back.
    #[error("restoring the failure snapshot failed: {message}")]
    Restore { message: String },
    /// A start script or its initrd (`vmrig build --start-scripts`).
    #[error("writing {}: {source}", .path.display())]
    WriteStartScript {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What kind of failure an error is: all a caller needs to decide on it (the CLI's exit
/// code: 2, 3, 4, 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The test's own input is wrong: its file, or its script does not compile.
    TestInput,
    /// A guest image could not be built.
    Image,
    /// A disk, or a disk quota, is full (wherever it was hit, an image build too).
    DiskFull(DiskFull),
    /// The host: a program missing or too old, KVM, the store, the output directory, ...
    Host,
}

impl RunError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        if let Some(full) = self.disk_full() {
            return ErrorKind::DiskFull(full);
        }
        match self {
            RunError::Script(ScriptError::Syntax(_) | ScriptError::Findings(_)) => {
                ErrorKind::TestInput
            }
            RunError::Image(_) => ErrorKind::Image,
            // The user named a directory without one, or the test file changed.
            RunError::FailureSnapshot(
                crate::failure::FailureError::Missing { .. }
                | crate::failure::FailureError::TestChanged { .. },
            ) => ErrorKind::TestInput,
            _ => ErrorKind::Host,
        }
    }

    /// The full disk that kept the run from taking place, if that is why, and where.
    pub fn disk_full(&self) -> Option<DiskFull> {
        let at = |path: &Path, source: &io::Error| {
            vmrig_store::is_disk_full(source).then(|| DiskFull::at(path))
        };
        match self {
            RunError::Image(e) => e.disk_full(),
            RunError::Script(ScriptError::Bridge(e)) | RunError::Python(e) => bridge_disk_full(e),
            RunError::StoreOpen(e) | RunError::HoldImage(e) => e.disk_full(),
            RunError::OutputDirCreate { dir, source }
            | RunError::OutputDirWrite { dir, source }
            | RunError::RunDir { dir, source } => at(dir, source),
            RunError::ReadScript { path, source } | RunError::WriteStartScript { path, source } => {
                at(path, source)
            }
            RunError::Capture { path, source, .. } => {
                vmrig_store::disk_full_in(source).map(|_| DiskFull::at(path))
            }
            RunError::QemuUnrunnable { source, .. } | RunError::NodeLayer { source, .. } => {
                vmrig_store::is_disk_full(source).then(DiskFull::default)
            }
            RunError::Switch { source, .. } | RunError::AddPort { source, .. } => {
                vmrig_store::disk_full_in(source)
            }
            RunError::Script(ScriptError::Syntax(_) | ScriptError::Findings(_))
            | RunError::QemuNotFound { .. }
            | RunError::QemuImgNotFound
            | RunError::QemuTooOld { .. }
            | RunError::NotQemu { .. }
            | RunError::Accel(_)
            | RunError::CreateMachine(_)
            | RunError::Restore { .. }
            | RunError::DuplicateMachine { .. } => None,
            RunError::FailureSnapshot(crate::failure::FailureError::Write { dir, source }) => {
                at(dir, source)
            }
            RunError::FailureSnapshot(_) => None,
        }
    }
}

/// The script's files live in the run directory or a temporary one, both in `$TMPDIR`.
fn bridge_disk_full(e: &BridgeError) -> Option<DiskFull> {
    match e {
        BridgeError::Io { source, .. } if vmrig_store::is_disk_full(source) => {
            Some(DiskFull::at(&std::env::temp_dir()))
        }
        _ => None,
    }
}

/// The kind of any error that reaches a caller, perhaps under context (`anyhow`): the kind
/// of the first of `err` and its causes that has one (a [`RunError`], a [`SpecError`], an
/// [`ImageError`], a [`ScriptError`], a store or I/O error of a full disk), else
/// [`ErrorKind::Host`].
pub fn kind_of(err: &(dyn StdError + 'static)) -> ErrorKind {
    std::iter::successors(Some(err), |&e| e.source())
        .find_map(own_kind)
        .unwrap_or(ErrorKind::Host)
}

fn own_kind(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    if let Some(run) = e.downcast_ref::<RunError>() {
        return Some(run.kind());
    }
    if e.is::<SpecError>() {
        return Some(ErrorKind::TestInput);
    }
    if let Some(image) = e.downcast_ref::<ImageError>() {
        return Some(
            image
                .disk_full()
                .map_or(ErrorKind::Image, ErrorKind::DiskFull),
        );
    }
    if let Some(script) = e.downcast_ref::<ScriptError>() {
        return Some(match script {
            ScriptError::Syntax(_) | ScriptError::Findings(_) => ErrorKind::TestInput,
            ScriptError::Bridge(b) => {
                bridge_disk_full(b).map_or(ErrorKind::Host, ErrorKind::DiskFull)
            }
        });
    }
    if let Some(bridge) = e.downcast_ref::<BridgeError>() {
        return Some(bridge_disk_full(bridge).map_or(ErrorKind::Host, ErrorKind::DiskFull));
    }
    if let Some(store) = e.downcast_ref::<StoreError>() {
        return store.disk_full().map(ErrorKind::DiskFull);
    }
    e.downcast_ref::<io::Error>()
        .filter(|io| vmrig_store::is_disk_full(io))
        .map(|_| ErrorKind::DiskFull(DiskFull::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    fn eacces() -> io::Error {
        io::Error::from_raw_os_error(libc::EACCES)
    }

    #[test]
    fn messages_read_as_they_did_as_strings() {
        let cases: Vec<(RunError, &str)> = vec![
            (
                RunError::QemuNotFound { qemu: "/nonexistent/qemu".into() },
                "`/nonexistent/qemu` not found: install QEMU (`sudo apt-get install qemu-system-x86 qemu-utils`) or name another with `--qemu PATH` (or VMRIG_QEMU)",
            ),
            (
                RunError::QemuImgNotFound,
                "`qemu-img` not found; install it with `sudo apt-get install qemu-utils`",
            ),
            (
                RunError::QemuUnrunnable { qemu: "bin/q".into(), source: eacces() },
                "cannot run `bin/q --version`: Permission denied (os error 13); name an executable QEMU with `--qemu PATH` (or VMRIG_QEMU)",
            ),
            (
                RunError::QemuTooOld { qemu: "bin/qemu-old".into(), found: (4, 2), needed: (7, 2) },
                "bin/qemu-old is QEMU 4.2, too old: vmrig needs QEMU 7.2 or newer (for `-netdev stream`): install a newer qemu-system-x86 or name another with `--qemu PATH` (or VMRIG_QEMU)",
            ),
            (
                RunError::NotQemu { qemu: "bin/hello".into(), printed: "hello".into() },
                "`bin/hello --version` did not print a QEMU version (it printed \"hello\"): name the QEMU system emulator with `--qemu PATH` (or VMRIG_QEMU)",
            ),
            (
                RunError::OutputDirCreate { dir: "out".into(), source: eacces() },
                "cannot create the output directory out: Permission denied (os error 13); choose another with `-o DIR`",
            ),
            (
                RunError::OutputDirWrite { dir: "out".into(), source: eacces() },
                "cannot write to the output directory out: Permission denied (os error 13); choose another with `-o DIR`",
            ),
            (
                RunError::RunDir { dir: "/tmp".into(), source: eacces() },
                "creating a run directory: Permission denied (os error 13)",
            ),
            (
                RunError::DuplicateMachine { name: "a".into() },
                "two machines are named `a`: name them with --vm-names",
            ),
            (
                RunError::NodeLayer { node: "a".into(), source: eacces() },
                "node `a`: Permission denied (os error 13)",
            ),
            (
                RunError::ReadScript { path: "t.py".into(), source: eacces() },
                "cannot read the test script t.py: Permission denied (os error 13)",
            ),
            (
                RunError::WriteStartScript { path: "d/run-a-vm".into(), source: eacces() },
                "writing d/run-a-vm: Permission denied (os error 13)",
            ),
            (
                RunError::StoreOpen(StoreError::NoStoreDir),
                "opening the store: find the store directory: none of VMRIG_STORE, XDG_CACHE_HOME and HOME is set",
            ),
            (
                RunError::Switch {
                    vlan: 2,
                    source: vmrig_net::NetError::InvalidName("x".into()),
                },
                "starting the switch of VLAN 2: invalid machine name \"x\" (must be non-empty, without '/', NUL or leading '.')",
            ),
            (
                RunError::CreateMachine(crate::ApiError::Machine("no such command".into())),
                "no such command",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), want, "{err:?}");
        }
        let kvm = vmrig_vm::accel::KvmUnusable("/dev/kvm does not exist".into());
        assert_eq!(RunError::from(kvm).to_string(), "--accel kvm was requested but KVM is not usable: /dev/kvm does not exist; run with `--accel auto` (TCG when KVM cannot be used) or `--accel tcg`");
    }

    #[test]
    fn the_kind_comes_from_the_variant() {
        let syntax = vmrig_python::check_syntax(
            Path::new("/nonexistent/python3"),
            &vmrig_spec::ScriptSource {
                text: "x".into(),
                filename: "t.toml".into(),
                first_line: 1,
                first_column: 1,
            },
        )
        .unwrap_err();
        // Python that cannot check the script is the host's problem.
        assert_eq!(RunError::Script(syntax).kind(), ErrorKind::Host);
        let image = RunError::Image(ImageError::UnknownPackage {
            package: "nosuchpkg".into(),
            nodes: vec!["a".into()],
        });
        assert_eq!(image.kind(), ErrorKind::Image);
        let host = [
            RunError::QemuImgNotFound,
            RunError::DuplicateMachine { name: "a".into() },
            RunError::OutputDirCreate {
                dir: "out".into(),
                source: eacces(),
            },
            RunError::Python(BridgeError::PythonNotFound {
                python: "python3".into(),
            }),
        ];
        for err in host {
            assert_eq!(err.kind(), ErrorKind::Host, "{err:?}");
        }
    }

    #[test]
    fn a_full_disk_is_its_own_kind_with_its_place() {
        let out = RunError::OutputDirCreate {
            dir: "out".into(),
            source: enospc(),
        };
        assert_eq!(
            out.kind(),
            ErrorKind::DiskFull(DiskFull::at(Path::new("out")))
        );
        let run_dir = RunError::RunDir {
            dir: "/tmp".into(),
            source: enospc(),
        };
        assert_eq!(
            run_dir.kind(),
            ErrorKind::DiskFull(DiskFull::at(Path::new("/tmp")))
        );
        // The script's files are in $TMPDIR.
        let python = RunError::Python(BridgeError::Io {
            context: "writing x".into(),
            source: enospc(),
        });
        assert_eq!(
            python.kind(),
            ErrorKind::DiskFull(DiskFull::at(&std::env::temp_dir()))
        );
        // An image build that hit a full disk: the disk, not the image.
        let image = RunError::Image(ImageError::Io {
            context: "writing the initrd".into(),
            source: enospc(),
        });
        assert_eq!(image.kind(), ErrorKind::DiskFull(DiskFull::default()));
        let store = RunError::StoreOpen(StoreError::CreateDir {
            path: "/s/.locks".into(),
            source: enospc(),
        });
        assert_eq!(
            store.kind(),
            ErrorKind::DiskFull(DiskFull::at(Path::new("/s/.locks")))
        );
    }

    #[test]
    fn kind_of_finds_the_first_typed_error_in_a_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("context")]
        struct Context(#[source] Box<dyn StdError + Send + Sync>);
        let spec = vmrig_spec::parse("nme = 1", Path::new("t.toml")).unwrap_err();
        assert_eq!(kind_of(&Context(Box::new(spec))), ErrorKind::TestInput);
        let run = RunError::QemuImgNotFound;
        assert_eq!(kind_of(&Context(Box::new(run))), ErrorKind::Host);
        let image = ImageError::MissingTools("missing host tools: mmdebstrap".into());
        assert_eq!(kind_of(&Context(Box::new(image))), ErrorKind::Image);
        assert_eq!(
            kind_of(&Context(Box::new(enospc()))),
            ErrorKind::DiskFull(DiskFull::default())
        );
        assert_eq!(kind_of(&Context(Box::new(eacces()))), ErrorKind::Host);
    }
}
