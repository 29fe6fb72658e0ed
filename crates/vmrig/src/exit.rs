//! Exit codes, and how an error is shown before the process exits with one.

use std::fmt;
use std::path::{Path, PathBuf};

use vmrig_image::ImageError;
use vmrig_spec::SpecError;

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

/// The exit code for `err`, by what is in its chain.
pub fn code_of(err: &anyhow::Error) -> i32 {
    if let Some(Reported(code)) = err.downcast_ref::<Reported>() {
        return *code;
    }
    if is_disk_full(&format!("{err:#}")) {
        return INFRA;
    }
    if err
        .chain()
        .any(|e| e.is::<SpecError>() || e.is::<crate::select::NoTests>())
    {
        USAGE
    } else if err.chain().any(|e| e.is::<ImageError>()) {
        IMAGE
    } else {
        INFRA
    }
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
        let text = chain_text(&err);
        if is_disk_full(&text) {
            eprintln!("error: {}", disk_full_message(&text, None));
            eprintln!("  cause: {text}");
        } else {
            eprintln!("error: {text}");
        }
    }
    code
}

/// `err` and its causes on one line, `a: b: c` (as `{:#}`), without repeating a cause that
/// an error's own message already ends with (`ImageError::Io` shows its source itself).
pub fn chain_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for e in err.chain() {
        let msg = e.to_string();
        if text.is_empty() {
            text = msg;
        } else if !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
    }
    text
}

/// Whether an error's text says that a disk (or a disk quota) is full: `ENOSPC`/`EDQUOT`
/// from vmrig itself (`... (os error 28)`) or in a build tool's output.
pub fn is_disk_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("Disk quota exceeded")
}

/// One line for a full disk: which of vmrig's places it is (the one the error names, else
/// the store), how much is free there now, and what makes room.
pub fn disk_full_message(text: &str, out_dir: Option<&Path>) -> String {
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
    // The most specific place the error names; the store when it names none.
    let named = places
        .iter()
        .filter(|(p, ..)| text.contains(&*p.to_string_lossy()))
        .max_by_key(|(p, ..)| p.as_os_str().len());
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

    #[test]
    fn codes_by_chain() {
        let spec = vmrig_spec::parse("nme = 1", std::path::Path::new("t.toml")).unwrap_err();
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
        assert_eq!(OK, 0);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = anyhow::Error::new(full).context("writing /x/y");
        assert_eq!(code_of(&err), INFRA);
        let empty = crate::select::NoTests("tests".into());
        assert_eq!(code_of(&anyhow::Error::new(empty)), USAGE);
    }

    #[test]
    fn a_full_disk_is_named_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // A build tool's output that names the output directory.
        let text = format!(
            "`mmdebstrap ...` failed (exit status: 25):\ngpg: error writing to '{}/x': No space left on device",
            out.display()
        );
        assert!(is_disk_full(&text));
        let msg = disk_full_message(&text, Some(&out));
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
        // Naming no known place: the store, with `vmrig store gc`.
        let msg = disk_full_message("write failed: No space left on device (os error 28)", None);
        assert!(msg.contains("(the image store"), "{msg}");
        assert!(
            msg.contains("`vmrig store gc`") && msg.contains("VMRIG_STORE"),
            "{msg}"
        );
        assert!(!is_disk_full("Permission denied (os error 13)"));
    }
}
