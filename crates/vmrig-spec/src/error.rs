//! [`SpecError`]: one problem in a test file, with its place.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

/// What kind of problem a [`SpecError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be read (the test file, `test_script_file`, a file `source`).
    Io,
    /// The file is not valid TOML.
    Syntax,
    /// A key that vmrig does not know.
    UnknownKey,
    /// A value of the wrong TOML type.
    WrongType,
    /// A required key is missing.
    Missing,
    /// Two keys that exclude each other are both set.
    Conflict,
    /// A value of the right type that is not allowed (range, syntax, reserved name, ...).
    Invalid,
}

impl ErrorKind {
    fn code(self) -> &'static str {
        match self {
            ErrorKind::Io => "vmrig::spec::io",
            ErrorKind::Syntax => "vmrig::spec::syntax",
            ErrorKind::UnknownKey => "vmrig::spec::unknown_key",
            ErrorKind::WrongType => "vmrig::spec::wrong_type",
            ErrorKind::Missing => "vmrig::spec::missing",
            ErrorKind::Conflict => "vmrig::spec::conflict",
            ErrorKind::Invalid => "vmrig::spec::invalid",
        }
    }
}

/// A problem in a test file.
///
/// `Display` is one self-contained line, `path:line:column: message` (or `path: message`
/// when the problem has no single place, e.g. a missing key); with miette the source line is
/// shown with a label under the offending text, and a `help`.
#[derive(Debug)]
pub struct SpecError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    path: PathBuf,
    message: String,
    location: Option<(usize, usize)>,
    span: Option<Range<usize>>,
    label: String,
    help: Option<String>,
    src: Option<NamedSource<String>>,
}

impl SpecError {
    pub(crate) fn new(
        kind: ErrorKind,
        path: &Path,
        src: Option<&str>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        let location = match (src, &span) {
            (Some(src), Some(span)) => Some(line_col(src, span.start)),
            _ => None,
        };
        SpecError(Box::new(Inner {
            kind,
            path: path.to_path_buf(),
            message: message.into(),
            location,
            span,
            label: String::new(),
            help: None,
            src: src.map(|s| NamedSource::new(path.display().to_string(), s.to_string())),
        }))
    }

    pub(crate) fn label(mut self, label: impl Into<String>) -> Self {
        self.0.label = label.into();
        self
    }

    pub(crate) fn help(mut self, help: impl Into<String>) -> Self {
        self.0.help = Some(help.into());
        self
    }

    /// What kind of problem this is.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The file the problem is in.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The message without the place.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// 1-based line, if the problem has a place.
    pub fn line(&self) -> Option<usize> {
        self.0.location.map(|(l, _)| l)
    }

    /// 1-based column (in characters), if the problem has a place.
    pub fn column(&self) -> Option<usize> {
        self.0.location.map(|(_, c)| c)
    }

    /// Byte range in the file, if the problem has a place.
    pub fn span(&self) -> Option<Range<usize>> {
        self.0.span.clone()
    }

    /// The hint shown under the message, if any.
    pub fn help_text(&self) -> Option<&str> {
        self.0.help.as_deref()
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.location {
            Some((line, col)) => {
                write!(
                    f,
                    "{}:{line}:{col}: {}",
                    self.0.path.display(),
                    self.0.message
                )
            }
            None => write!(f, "{}: {}", self.0.path.display(), self.0.message),
        }
    }
}

impl std::error::Error for SpecError {}

impl Diagnostic for SpecError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.0.kind.code()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.0
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display + 'a>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.0.src.as_ref().map(|s| s as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.0.span.as_ref()?;
        self.0.src.as_ref()?;
        let label = if self.0.label.is_empty() {
            None
        } else {
            Some(self.0.label.clone())
        };
        Some(Box::new(std::iter::once(
            LabeledSpan::new_primary_with_span(label, span.start..span.end.max(span.start)),
        )))
    }
}

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}
