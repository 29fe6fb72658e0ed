use vmrig_store::StoreError;

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
    #[error("unknown Debian package `{package}` (asked for by node {nodes}); check its name with `apt-cache search <name>` or `apt-cache policy <name>`")]
    UnknownPackage { package: String, nodes: String },
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
}
