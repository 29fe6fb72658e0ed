//! What can go wrong between vmrig and the script's Python.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "{}: not found. vmrig runs test scripts with Python 3.9 or newer: \
         install it (e.g. `apt-get install python3`) or name another with `--python PATH` \
         (or VMRIG_PYTHON)",
        .python.display()
    )]
    PythonNotFound { python: PathBuf },
    #[error(
        "{} is Python {version}, but vmrig needs Python 3.9 or newer: \
         install a newer one (e.g. `apt-get install python3` on a current distribution) \
         or name another with `--python PATH` (or VMRIG_PYTHON)",
        .python.display()
    )]
    PythonTooOld {
        python: PathBuf,
        version: crate::PythonVersion,
    },
    #[error("{}: {detail}", .python.display())]
    PythonFailed { python: PathBuf, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the test script's connection to vmrig broke: {0}")]
    Protocol(String),
}

impl BridgeError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        BridgeError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn spawn(python: &Path, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::NotFound {
            BridgeError::PythonNotFound {
                python: python.to_path_buf(),
            }
        } else {
            BridgeError::io(format!("starting {}", python.display()), e)
        }
    }
}
