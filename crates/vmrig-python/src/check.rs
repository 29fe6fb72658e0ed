//! What is known about a test script before it runs: the static check (`vmrig check`, and
//! the first step of every run) and the typed stubs of the API (`vmrig stubs`).
//!
//! Both come from the one definition of the API, the embedded module [`crate::PYTHON_MODULE`]:
//! `api_tool.py` executes it (without a driver) in the host's Python and reads the globals a
//! script gets (`_Session.symbols`), their attributes and their signatures with `inspect`;
//! the script's own names come from `ast` and `symtable`. So a method added to
//! `vmrig_driver.py` is known to the check and the stubs with no list to update.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use serde_json::json;

use crate::error::BridgeError;
use crate::syntax::{first_line, probe_python, run_python, ScriptError, SyntaxDiagnostic};
use crate::{MachineInfo, ScriptSource, PYTHON_MODULE};

const API_TOOL_PY: &str = include_str!("../python/api_tool.py");

/// The globals a script gets besides the driver's own: its machines (`server`, and
/// `machine` when there is one) and VLANs (`vlan1`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ScriptNames {
    pub machines: Vec<MachineInfo>,
    pub vlans: Vec<u8>,
}

impl ScriptNames {
    /// The machines named `names` (node names; their Python names are derived) on `vlans`.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>, vlans: &[u8]) -> Self {
        let mut vlans = vlans.to_vec();
        vlans.sort_unstable();
        vlans.dedup();
        ScriptNames {
            machines: names.into_iter().map(MachineInfo::new).collect(),
            vlans,
        }
    }
}

/// One mistake the check found: a place in the user's file and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The test file (an inline `test_script`) or the script file.
    pub filename: PathBuf,
    /// 1-based line and column (in characters) in `filename`.
    pub line: usize,
    pub column: usize,
    /// What is wrong, with the closest valid name when there is one ("did you mean").
    pub message: String,
    /// The script's line, and the 1-based column of the mistake within it.
    pub text: String,
    pub caret: usize,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.filename.display(),
            self.line,
            self.column,
            self.message
        )?;
        let trimmed = self.text.trim_start();
        if !trimmed.is_empty() {
            let indent = self.text.chars().count() - trimmed.chars().count();
            let caret = self.caret.saturating_sub(1).saturating_sub(indent);
            write!(
                f,
                "\n    {}\n    {}^",
                trimmed.trim_end(),
                " ".repeat(caret)
            )?;
        }
        Ok(())
    }
}

/// Everything the check found in one script, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Findings(pub Vec<Finding>);

impl fmt::Display for Findings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, finding) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// Runs `api_tool.py` with the JSON request `request`; its JSON answer.
fn ask(python: &Path, request: &serde_json::Value) -> Result<String, BridgeError> {
    probe_python(python)?;
    run_python(
        python,
        &["-B", "-c", API_TOOL_PY],
        Some(request.to_string().as_bytes()),
    )
}

/// Checks `src` before anything is built or booted: its syntax, then names that are not
/// defined anywhere (the driver's globals, `names` and whatever the script binds), unknown
/// attributes of the machines, VLANs and the driver's globals, and calls of the API with
/// an unknown keyword or a wrong number of arguments. Dynamic code is left alone (a name
/// bound in any scope, `exec`, a star import, calls with `*args`). A script that passed is
/// remembered for the process: `vmrig run` checks every file first and `run_test` again.
pub fn check_script(
    python: &Path,
    src: &ScriptSource,
    names: &ScriptNames,
) -> Result<(), ScriptError> {
    static PASSED: OnceLock<Mutex<HashSet<u64>>> = OnceLock::new();
    let key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            python,
            &src.text,
            &src.filename,
            src.first_line,
            src.first_column,
        )
            .hash(&mut h);
        names.hash(&mut h);
        h.finish()
    };
    let passed = PASSED.get_or_init(Default::default);
    if passed.lock().unwrap().contains(&key) {
        return Ok(());
    }
    let request = json!({
        "command": "check",
        "module": PYTHON_MODULE,
        "text": src.text,
        "filename": src.filename.to_string_lossy(),
        "first_line": first_line(src),
        "first_column": src.first_column.max(1),
        "machines": names.machines,
        "vlans": names.vlans,
    });
    let out = ask(python, &request)?;

    #[derive(Deserialize)]
    struct Syntax {
        #[serde(rename = "type")]
        kind: String,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
        text: Option<String>,
    }
    #[derive(Deserialize)]
    struct Found {
        line: usize,
        column: usize,
        message: String,
        text: String,
        caret: usize,
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        ok: bool,
        syntax: Option<Syntax>,
        #[serde(default)]
        findings: Vec<Found>,
    }
    let answer: Answer =
        serde_json::from_str(out.trim()).map_err(|e| BridgeError::PythonFailed {
            python: python.to_path_buf(),
            detail: format!("the script check answered {out:?}: {e}"),
        })?;
    if let Some(s) = answer.syntax {
        return Err(ScriptError::Syntax(Box::new(SyntaxDiagnostic {
            filename: src.filename.clone(),
            line: s.line,
            column: s.column,
            text: s.text,
            kind: s.kind,
            message: s.message,
        })));
    }
    if answer.ok || answer.findings.is_empty() {
        passed.lock().unwrap().insert(key);
        return Ok(());
    }
    Err(ScriptError::Findings(Findings(
        answer
            .findings
            .into_iter()
            .map(|f| Finding {
                filename: src.filename.clone(),
                line: f.line,
                column: f.column,
                message: f.message,
                text: f.text,
                caret: f.caret,
            })
            .collect(),
    )))
}

/// The file names [`stubs`] writes: the API module, the script's globals (for mypy:
/// `from vmrig_globals import *`), and the same globals as extra builtins (pyright and
/// pylance read `__builtins__.pyi` at a project's root or its `stubPath`).
pub const STUB_FILES: [&str; 3] = ["vmrig_driver.pyi", "vmrig_globals.pyi", "__builtins__.pyi"];

/// The typed stubs of the API, generated from the module itself: `(file name, text)` for
/// each of [`STUB_FILES`]. With `names`, the globals also hold the test's machines and
/// VLANs, typed.
pub fn stubs(
    python: &Path,
    names: Option<&ScriptNames>,
) -> Result<Vec<(String, String)>, BridgeError> {
    let request = json!({
        "command": "stubs",
        "module": PYTHON_MODULE,
        "machines": names.map(|n| &n.machines),
        "vlans": names.map(|n| n.vlans.clone()).unwrap_or_default(),
    });
    let out = ask(python, &request)?;
    #[derive(Deserialize)]
    struct Answer {
        files: std::collections::BTreeMap<String, String>,
    }
    let mut answer: Answer =
        serde_json::from_str(out.trim()).map_err(|e| BridgeError::PythonFailed {
            python: python.to_path_buf(),
            detail: format!("the stub generator answered {out:?}: {e}"),
        })?;
    STUB_FILES
        .iter()
        .map(|name| {
            let text = answer
                .files
                .remove(*name)
                .ok_or_else(|| BridgeError::PythonFailed {
                    python: python.to_path_buf(),
                    detail: format!("the stub generator wrote no {name}"),
                })?;
            Ok((name.to_string(), text))
        })
        .collect()
}

/// Writes [`stubs`] into `dir` (made if missing); the paths written.
pub fn write_stubs(
    python: &Path,
    dir: &Path,
    names: Option<&ScriptNames>,
) -> Result<Vec<PathBuf>, BridgeError> {
    let files = stubs(python, names)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| BridgeError::io(format!("creating {}", dir.display()), e))?;
    files
        .into_iter()
        .map(|(name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| BridgeError::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        })
        .collect()
}
