//! The script's source, the interpreter probe and the syntax check that runs
//! before any VM boots.

use crate::error::BridgeError;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

const CHECK_SYNTAX_PY: &str = include_str!("../python/check_syntax.py");

pub use vmrig_spec::ScriptSource;

/// `first_line` below 1 is taken as 1.
pub(crate) fn first_line(src: &ScriptSource) -> usize {
    src.first_line.max(1)
}

/// A CPython version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PythonVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Where and why a script does not compile. `line`/`column` are 1-based and
/// in `filename` (the user's file, with the script's offset applied); `text`
/// is the offending line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxDiagnostic {
    pub filename: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub text: Option<String>,
    /// Python's class name: `SyntaxError`, `IndentationError`, `TabError`, `ValueError`.
    pub kind: String,
    pub message: String,
}

impl fmt::Display for SyntaxDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&syntax_message(
            &self.filename,
            self.line,
            self.column,
            self.text.as_deref(),
            &self.kind,
            &self.message,
        ))
    }
}

/// Why a script cannot run: it does not compile, the static check found mistakes
/// ([`crate::check_script`]), or Python could not check it.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("{0}")]
    Syntax(Box<SyntaxDiagnostic>),
    #[error("{0}")]
    Findings(crate::Findings),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
}

fn syntax_message(
    filename: &Path,
    line: Option<usize>,
    column: Option<usize>,
    text: Option<&str>,
    kind: &str,
    message: &str,
) -> String {
    let mut s = filename.display().to_string();
    if let Some(line) = line {
        s += &format!(":{line}");
        if let Some(col) = column {
            s += &format!(":{col}");
        }
    }
    s += &format!(": {kind} in the test script: {message}");
    if let Some(text) = text {
        let trimmed = text.trim_start();
        s += &format!("\n    {}", trimmed.trim_end());
        if let Some(col) = column {
            let indent = text.len() - trimmed.len();
            let caret = col.saturating_sub(1).saturating_sub(indent);
            s += &format!("\n    {}^", " ".repeat(caret));
        }
    }
    s
}

/// Run `python` with `args`, returning stdout; maps "not found" to the install hint. The
/// child dies with the calling thread, which waits for it (`vmrig_vm::process::command`).
pub(crate) fn run_python(
    python: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, BridgeError> {
    let mut cmd = vmrig_vm::process::command(python);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| BridgeError::spawn(python, e))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A child that exits early closes the pipe; its output explains why.
        let _ = pipe.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| BridgeError::io(format!("waiting for {}", python.display()), e))?;
    if !out.status.success() {
        return Err(BridgeError::PythonFailed {
            python: python.to_path_buf(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Check that `python` runs and is at least [`crate::MIN_PYTHON`]. A good answer is
/// remembered for the process: `check_syntax` and `ScriptChild::spawn` both ask, and each
/// ask would otherwise start another interpreter.
pub fn probe_python(python: &Path) -> Result<PythonVersion, BridgeError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static KNOWN: OnceLock<Mutex<HashMap<std::path::PathBuf, PythonVersion>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    if let Some(version) = known.lock().unwrap().get(python) {
        return Ok(*version);
    }
    let version = probe_python_uncached(python)?;
    known.lock().unwrap().insert(python.to_path_buf(), version);
    Ok(version)
}

fn probe_python_uncached(python: &Path) -> Result<PythonVersion, BridgeError> {
    let out = run_python(
        python,
        &["-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        None,
    )?;
    let text = out.trim();
    let parsed = text.split_once('.').and_then(|(a, b)| {
        Some(PythonVersion {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    });
    let version = parsed.ok_or_else(|| BridgeError::PythonFailed {
        python: python.to_path_buf(),
        detail: format!("unexpected version output {text:?}"),
    })?;
    if version < crate::MIN_PYTHON {
        return Err(BridgeError::PythonTooOld {
            python: python.to_path_buf(),
            version,
        });
    }
    Ok(version)
}

/// Compile the script (without running it) so a syntax error is reported
/// with the user's file, line and text before any VM boots.
pub fn check_syntax(python: &Path, src: &ScriptSource) -> Result<(), ScriptError> {
    probe_python(python)?;
    let filename = src.filename.to_string_lossy().into_owned();
    let first_line = crate::syntax::first_line(src).to_string();
    let out = run_python(
        python,
        &["-B", "-c", CHECK_SYNTAX_PY, &filename, &first_line],
        Some(src.text.as_bytes()),
    )?;
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
        #[serde(default, rename = "type")]
        kind: String,
        #[serde(default)]
        message: String,
        line: Option<usize>,
        column: Option<usize>,
        text: Option<String>,
    }
    let answer: Answer =
        serde_json::from_str(out.trim()).map_err(|e| BridgeError::PythonFailed {
            python: python.to_path_buf(),
            detail: format!("syntax check answered {out:?}: {e}"),
        })?;
    if answer.ok {
        return Ok(());
    }
    Err(ScriptError::Syntax(Box::new(SyntaxDiagnostic {
        filename: src.filename.clone(),
        line: answer.line,
        column: answer.column,
        text: answer.text,
        kind: answer.kind,
        message: answer.message,
    })))
}

/// The global names a test script sees (the driver's functions and classes; not the
/// machines), as upstream's `generate-driver-symbols` lists them for pyflakes.
pub fn driver_symbols(python: &Path) -> Result<Vec<String>, BridgeError> {
    probe_python(python)?;
    let dir =
        tempfile::tempdir().map_err(|e| BridgeError::io("creating a temporary directory", e))?;
    let module = dir.path().join(crate::MODULE_FILE_NAME);
    std::fs::write(&module, crate::PYTHON_MODULE)
        .map_err(|e| BridgeError::io(format!("writing {}", module.display()), e))?;
    let code = "import sys; sys.path.insert(0, sys.argv[1]); import vmrig_driver as v; \
                print(','.join(v._Session({'machines': [], 'vlans': []}, None).symbols()))";
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let out = run_python(python, &["-B", "-c", code, &dir_arg], None)?;
    Ok(out.trim().split(',').map(str::to_owned).collect())
}
