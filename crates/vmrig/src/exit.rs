//! Exit codes, and how an error is shown before the process exits with one.

use std::fmt;
use std::path::{Path, PathBuf};

use vmrig_driver::ErrorKind;
use vmrig_spec::SpecError;
use vmrig_store::DiskFull;

/// Everything succeeded.
pub const OK: i32 = 0;
/// A test failed (`vmrig run`).
#[allow(dead_code)]
pub const TEST_FAILED: i32 = 1;
/// Bad arguments (clap also exits with 2), or an error in a test file.
pub const USAGE: i32 = 2;
/// A guest image could not be built.
pub const IMAGE: i32 = 3;
/// Anything else: the store, QEMU, host resources.
pub const INFRA: i32 = 4;

/// Shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  a test failed
  2  usage error, or an error in a test file (file:line:column on stderr)
  3  a guest image could not be built (missing host tool, unknown package, builder failure)
  4  infrastructure error (store, QEMU, host resources, anything else)

Environment:
  VMRIG_STORE    store directory (default: $XDG_CACHE_HOME/vmrig/store or ~/.cache/vmrig/store)
  VMRIG_MIRROR   Debian mirror URL for image builds (default: the host's apt sources)";

/// An error that has already been shown to the user; only its exit code is left.
#[derive(Debug)]
pub struct Reported(pub i32);

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error already reported (exit code {})", self.0)
    }
}

impl std::error::Error for Reported {}

/// Shows a test file error on stderr: miette's report with the source line, a label under
/// the offending text, and the help.
pub fn show_spec_error(err: &SpecError) {
    eprintln!("{:?}", Fancy(err));
}

struct Fancy<'a>(&'a dyn miette::Diagnostic);

impl fmt::Debug for Fancy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use miette::ReportHandler;
        use std::io::IsTerminal;
        let mut opts = miette::MietteHandlerOpts::new();
        if !std::io::stderr().is_terminal() {
            // Logs: keep `file:line:column: message` on one line, for grep and editors.
            opts = opts.wrap_lines(false);
        }
        opts.build().debug(self.0, f)
    }
}

/// The exit code of a failure of `kind`.
pub fn exit_code(kind: &ErrorKind) -> i32 {
    match kind {
        ErrorKind::TestInput => USAGE,
        ErrorKind::Image => IMAGE,
        ErrorKind::DiskFull(_) | ErrorKind::Host => INFRA,
    }
}

/// What kind of failure `err` is: by the CLI's own typed errors in its chain, else the
/// library's ([`vmrig_driver::kind_of`]); never by its text.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    err.chain()
        .find_map(|e| {
            use vmrig_store::remote::CacheError;
            if e.is::<crate::select::NoTests>()
                || matches!(
                    e.downcast_ref::<CacheError>(),
                    Some(CacheError::BadUrl { .. } | CacheError::BadMode { .. })
                )
            {
                Some(ErrorKind::TestInput)
            } else {
                e.downcast_ref::<crate::run_cmd::OutputDirError>()
                    .map(crate::run_cmd::OutputDirError::kind)
            }
        })
        .unwrap_or_else(|| vmrig_driver::kind_of(&**err))
}

/// The exit code for `err`: the one already reported, else that of its kind.
pub fn code_of(err: &anyhow::Error) -> i32 {
    if let Some(Reported(code)) = err.downcast_ref::<Reported>() {
        return *code;
    }
    exit_code(&kind_of(err))
}

/// Shows the error of a command, if any, and returns the process exit code.
pub fn finish(result: anyhow::Result<i32>) -> i32 {
    let err = match result {
        Ok(code) => return code,
        Err(err) => err,
    };
    let code = code_of(&err);
    if err.downcast_ref::<Reported>().is_some() {
        return code;
    }
    if let Some(spec) = err.chain().find_map(|e| e.downcast_ref::<SpecError>()) {
        // Context added on top of the spec error (if any) first, then the report.
        for outer in err.chain().take_while(|e| !e.is::<SpecError>()) {
            eprintln!("error: {outer}");
        }
        show_spec_error(spec);
    } else {
        let text = chain_text(&*err);
        if let ErrorKind::DiskFull(full) = kind_of(&err) {
            eprintln!("error: {}", disk_full_message(&full, None));
            eprintln!("  cause: {text}");
        } else {
            eprintln!("error: {text}");
        }
    }
    code
}

/// `err` and its causes on one line, `a: b: c` (as anyhow's `{:#}`), without repeating a
/// cause that an error's own message already holds (`ImageError::Io` shows its source
/// itself, `RunError::OutputDirCreate` in the middle of its text).
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for e in std::iter::successors(Some(err), |&e| e.source()) {
        let msg = e.to_string();
        if text.is_empty() {
            text = msg;
        } else if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
    }
    text
}

/// One line for a full disk: which of vmrig's places it is (the most specific one that
/// holds the path the error names, else the store), how much is free there now, and what
/// makes room.
pub fn disk_full_message(full: &DiskFull, out_dir: Option<&Path>) -> String {
    let mut places: Vec<(PathBuf, &str, &str)> = Vec::new();
    if let Ok(store) = vmrig_store::default_store_dir() {
        places.push((
            store,
            "the image store",
            "remove unused images with `vmrig store gc`, free space on that disk, or set \
             VMRIG_STORE to a directory on a bigger disk",
        ));
    }
    if let Some(out) = out_dir {
        places.push((
            out.to_owned(),
            "the output directory",
            "free space on that disk or choose another directory with `-o DIR`",
        ));
    }
    places.push((
        std::env::temp_dir(),
        "the temporary directory",
        "free space on that disk or set TMPDIR to a directory on a bigger disk",
    ));
    let named = full.path.as_deref().and_then(|path| {
        places
            .iter()
            .filter(|(p, ..)| path.starts_with(p))
            .max_by_key(|(p, ..)| p.as_os_str().len())
    });
    let (path, what, fix) = named.unwrap_or(&places[0]);
    let free = path
        .ancestors()
        .find(|p| p.exists())
        .and_then(vmrig_store::free_bytes)
        .map(|b| format!(", {} free", crate::units::format_bytes(b)))
        .unwrap_or_default();
    format!(
        "no space left on the disk of {} ({what}{free}): {fix}",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use vmrig_driver::RunError;
    use vmrig_image::ImageError;

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn every_kind_has_its_exit_code() {
        assert_eq!(exit_code(&ErrorKind::TestInput), USAGE);
        assert_eq!(exit_code(&ErrorKind::Image), IMAGE);
        assert_eq!(exit_code(&ErrorKind::DiskFull(DiskFull::default())), INFRA);
        assert_eq!(exit_code(&ErrorKind::Host), INFRA);
        assert_eq!((OK, TEST_FAILED, USAGE, IMAGE, INFRA), (0, 1, 2, 3, 4));
    }

    #[test]
    fn codes_by_the_typed_errors_in_the_chain() {
        let spec = vmrig_spec::parse("nme = 1", Path::new("t.toml")).unwrap_err();
        assert_eq!(code_of(&anyhow::Error::new(spec).context("loading")), USAGE);
        let image = ImageError::MissingTools("missing host tools: x".into());
        assert_eq!(
            code_of(&anyhow::Error::new(image).context("building")),
            IMAGE
        );
        assert_eq!(code_of(&anyhow::anyhow!("qemu died")), INFRA);
        assert_eq!(
            code_of(&anyhow::Error::new(Reported(TEST_FAILED))),
            TEST_FAILED
        );
        let empty = crate::select::NoTests("tests".into());
        assert_eq!(code_of(&anyhow::Error::new(empty)), USAGE);
        let qemu = RunError::QemuNotFound {
            qemu: "/nope".into(),
        };
        assert_eq!(code_of(&anyhow::Error::new(qemu)), INFRA);
        let unknown = RunError::Image(ImageError::UnknownPackage {
            package: "nosuchpkg".into(),
            nodes: vec!["a".into()],
        });
        assert_eq!(code_of(&anyhow::Error::new(unknown)), IMAGE);
    }

    #[test]
    fn a_full_disk_is_told_by_its_error_kind_not_by_its_text() {
        // An image build that ran out of space is the host's problem, not the image's.
        let full = ImageError::Io {
            context: "writing the initrd".into(),
            source: enospc(),
        };
        let err = anyhow::Error::new(full).context("building");
        assert_eq!(kind_of(&err), ErrorKind::DiskFull(DiskFull::default()));
        assert_eq!(code_of(&err), INFRA);
        // The store's error names the path.
        let store = vmrig_store::StoreError::CreateDir {
            path: "/s/.locks".into(),
            source: enospc(),
        };
        let err = anyhow::Error::new(store).context("failed to open the image store");
        assert_eq!(
            kind_of(&err),
            ErrorKind::DiskFull(DiskFull::at(Path::new("/s/.locks")))
        );
        // A bare io::Error under context.
        let err = anyhow::Error::new(enospc()).context("writing /x/y");
        assert_eq!(code_of(&err), INFRA);
        assert!(matches!(kind_of(&err), ErrorKind::DiskFull(_)));
        // The words alone do not make a full disk.
        let words = anyhow::anyhow!("No space left on device");
        assert_eq!(kind_of(&words), ErrorKind::Host);
        let words = ImageError::MissingTools("No space left on device".into());
        assert_eq!(kind_of(&anyhow::Error::new(words)), ErrorKind::Image);
    }

    #[test]
    fn the_chain_is_one_line_without_repeats() {
        let err = RunError::OutputDirCreate {
            dir: "out".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            chain_text(&err),
            "cannot create the output directory out: Permission denied (os error 13); choose another with `-o DIR`"
        );
        let err = anyhow::Error::new(vmrig_store::StoreError::CreateDir {
            path: "/s/.locks".into(),
            source: enospc(),
        })
        .context("failed to open the image store");
        assert_eq!(
            chain_text(&*err),
            "failed to open the image store: create directory /s/.locks: No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_full_disk_is_named_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // A path in the output directory (as a build tool's output named it).
        let full = DiskFull::at(&out.join("x"));
        let msg = disk_full_message(&full, Some(&out));
        let want = format!(
            "no space left on the disk of {} (the output directory, ",
            out.display()
        );
        assert!(msg.starts_with(&want), "{msg}");
        assert!(
            msg.ends_with(
                " free): free space on that disk or choose another directory with `-o DIR`"
            ),
            "{msg}"
        );
        // In the temporary directory (the run directory, the script's files).
        let msg = disk_full_message(&DiskFull::at(&std::env::temp_dir()), None);
        assert!(msg.contains("(the temporary directory"), "{msg}");
        assert!(msg.contains("set TMPDIR"), "{msg}");
        // No known place, or no path: the store, with `vmrig store gc`.
        for full in [DiskFull::default(), DiskFull::at(Path::new("/nowhere/x"))] {
            let msg = disk_full_message(&full, None);
            assert!(msg.contains("(the image store"), "{msg}");
            assert!(
                msg.contains("`vmrig store gc`") && msg.contains("VMRIG_STORE"),
                "{msg}"
            );
        }
    }
}
