use std::path::PathBuf;

use vmrig_store::{DiskFull, StoreError};

/// Why an image could not be built. Messages read well after "failed to build image: ".
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    MissingTools(String),
    /// A build as a normal user cannot work on this host (user namespaces, subordinate ids):
    /// one line with the fix.
    #[error("{0}")]
    Unprivileged(String),
    #[error("could not run `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Tool {
        command: String,
        status: String,
        output: String,
        lines: Vec<String>,
    },
    /// A build tool failed for want of disk space: its output said so (the one place that
    /// reads a tool's output for that is `run::run_tool`). Shown as [`ImageError::Tool`].
    #[error("`{command}` failed ({status}):\n{output}")]
    ToolDiskFull {
        command: String,
        status: String,
        output: String,
        /// The first absolute path named by the line that said so, if any.
        path: Option<PathBuf>,
    },
    #[error(
        "unknown Debian package `{package}` (asked for by node {}); check its name with \
         `apt-cache search <name>` or `apt-cache policy <name>`",
        .nodes.join(", ")
    )]
    UnknownPackage {
        package: String,
        /// The nodes whose image asked for it.
        nodes: Vec<String>,
    },
    /// A local package file's dependency cannot be installed from the archive (apt's
    /// "Depends: X but it is not installable").
    #[error(
        "local package `{package}` (of node {}) depends on `{dependency}`, {reason}; check \
         that the package's Depends: can be met from the node's suite (`apt-cache policy \
         <name>`), or add the missing package to `packages`",
        .nodes.join(", ")
    )]
    UnmetDependency {
        /// The package apt could not install (as its control file names it).
        package: String,
        /// The dependency as apt writes it (`foo (>= 2)`).
        dependency: String,
        /// apt's reason, from "but": `but it is not installable`.
        reason: String,
        nodes: Vec<String>,
    },
    #[error(
        "the local package {} changed while the image was being built; run the test again",
        .path.display()
    )]
    LocalDebChanged { path: PathBuf },
    #[error("the kernel package has no {what} (looked in {dir})")]
    KernelLayout { what: &'static str, dir: String },
    #[error(transparent)]
    Modules(#[from] crate::modules::UnknownModule),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }

    /// The full disk that made the build fail, if that is why (decided from the errors'
    /// kinds, and from a tool's output in `run::run_tool`). A path is known for a tool
    /// whose output names one, and for the store's own errors.
    pub fn disk_full(&self) -> Option<DiskFull> {
        match self {
            ImageError::ToolDiskFull { path, .. } => Some(DiskFull { path: path.clone() }),
            ImageError::Io { source, .. } | ImageError::Spawn { source, .. } => {
                vmrig_store::is_disk_full(source).then(DiskFull::default)
            }
            ImageError::Store(e) => e.disk_full(),
            _ => None,
        }
    }
}
