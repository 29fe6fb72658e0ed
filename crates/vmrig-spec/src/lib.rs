//! vmrig-spec: a vmrig test file (TOML) turned into a typed, validated [`TestSpec`].
//!
//! ```toml
//! name = "client-server"
//! test_script = '''
//! start_all()
//! server.wait_for_open_port(80)
//! '''
//!
//! [defaults]
//! packages = ["iproute2"]
//!
//! [nodes.server]
//! packages = ["nginx-light"]
//! firewall.allowed_tcp_ports = [80]
//!
//! [nodes.client]
//! packages = ["curl"]
//! ```
//!
//! [`load`] reads a file, [`parse`] takes its text. The only I/O is reading the test file, the
//! `test_script_file`, and checking that each file `source` exists (for a directory: walking
//! its tree, which may hold only files, directories and symlinks; see [`source_tree`]).
//!
//! # Validation
//!
//! Every key is checked against the keys allowed at its place; an unknown key is an error that
//! names the file, line and column and the closest valid key. Wrong types, values out of range,
//! malformed names (nodes, packages, users, units), relative guest paths, a missing or doubled
//! script, missing files and conflicting keys are errors too. A [`SpecError`] displays as one
//! line, `path:line:column: message`, and is a [`miette::Diagnostic`] with the source, a label
//! and a help text. The first error in document order is reported.
//!
//! [`TestSpec::places`] keeps the line and column of every key and of every string in a list,
//! for errors found after parsing (an unknown package: [`TestSpec::package_place`]).
//!
//! # `[defaults]`
//!
//! `[defaults]` takes the same keys as a node and is merged into every node:
//!
//! | keys | rule |
//! | --- | --- |
//! | `memory`, `cpus`, `graphics`, `suite`, `mirror`, `snapshot`, `static_addresses`, `firewall.enable` | the node's value if set, else the default's, else the built-in default |
//! | `vlans` | the node's list if set (even `[]`), else the default's, else `[1]` |
//! | `packages` | defaults first, then the node's; later duplicates dropped |
//! | `kernel_params`, `setup` | defaults first, then the node's (kept as written, duplicates too) |
//! | `firewall.allowed_tcp_ports`, `firewall.allowed_udp_ports` | defaults first, then the node's; later duplicates dropped |
//! | `users`, `files`, `services` | union by name; where both have an entry, the node's entry replaces the default's whole (entries are not merged key by key) |
//!
//! Every value is validated where it is written, so an error in `[defaults]` points into
//! `[defaults]`.
//!
//! # Image inputs
//!
//! [`NodeSpec::image_inputs`] is what decides a node's package image: suite, mirror, the sorted
//! and deduplicated packages of the node and of its users, and the `setup` commands.
//! [`ImageInputs::hash`] names it; nodes with equal inputs share an image.

mod error;
mod local_deb;
mod model;
mod parse;
mod places;
mod source;

use std::path::Path;

pub use error::{line_col, ErrorKind, SpecError};
pub use local_deb::{check_deb, is_local_path, DebProblem};
pub use model::*;
pub use parse::{
    suggest, FILE_KEYS, FIREWALL_KEYS, NODE_KEYS, PYTHON_KEYWORDS, RESERVED_NAMES, SERVICE_KEYS,
    SERVICE_TYPES, TOP_KEYS, USER_KEYS,
};
pub use places::{Place, Places};
pub use source::{source_digest, source_tree, SourceEntry, SourceError, SourceKind};

/// Read and parse the test file at `path` (and its `test_script_file`, if any).
pub fn load(path: &Path) -> Result<TestSpec, SpecError> {
    parse::parse(&read(path)?, path, true)
}

/// [`load`] for a file whose machines a program drives (the Rust API, `vmrig::Run`): the
/// test script may be left out (the spec's script is then empty).
pub fn load_machines(path: &Path) -> Result<TestSpec, SpecError> {
    parse::parse(&read(path)?, path, false)
}

fn read(path: &Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(
            ErrorKind::Io,
            path,
            None,
            None,
            format!("cannot read test file: {e}"),
        )
        .help("check the path of the test file")
    })
}

/// Parse the text of a test file. `path` is used in messages and to resolve
/// `test_script_file` and file `source`s (relative to its directory).
pub fn parse(text: &str, path: &Path) -> Result<TestSpec, SpecError> {
    parse::parse(text, path, true)
}
