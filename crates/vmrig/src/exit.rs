//! Exit codes, and how an error is shown before the process exits with one.

use std::fmt;

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
    if err.chain().any(|e| e.is::<SpecError>()) {
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
        eprintln!("error: {err:#}");
    }
    code
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
    }
}
