//! The TOML walker: every key is checked against the keys allowed at its place, every value
//! against its type and rules, and every error carries the byte span of the offending text.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, Key, TableLike, Value};

use crate::error::{ErrorKind, SpecError};
use crate::model::*;
use crate::source::SourceError;

type Span = Option<Range<usize>>;
type Result<T> = std::result::Result<T, SpecError>;

/// Keys allowed at the top level of a test file.
pub const TOP_KEYS: &[&str] = &[
    "name",
    "test_script",
    "test_script_file",
    "global_timeout",
    "defaults",
    "nodes",
];
/// Keys allowed in a node and in `[defaults]`.
pub const NODE_KEYS: &[&str] = &[
    "packages",
    "memory",
    "cpus",
    "vlans",
    "graphics",
    "kernel_params",
    "users",
    "files",
    "services",
    "sockets",
    "shared_dirs",
    "firewall",
    "setup",
    "suite",
    "mirror",
    "snapshot",
    "static_addresses",
];
/// Keys allowed in `users.<name>`.
pub const USER_KEYS: &[&str] = &[
    "uid", "groups", "shell", "password", "system", "home", "packages",
];
/// Keys allowed in `files."<path>"`.
pub const FILE_KEYS: &[&str] = &["text", "source", "mode", "owner", "group"];
/// Keys allowed in `services.<name>`.
pub const SERVICE_KEYS: &[&str] = &[
    "enable",
    "script",
    "exec_start",
    "wanted_by",
    "after",
    "requires",
    "user",
    "environment",
    "type",
    "service_config",
];
/// Keys allowed in `sockets.<name>`.
pub const SOCKET_KEYS: &[&str] = &[
    "enable",
    "listen_streams",
    "listen_datagrams",
    "accept",
    "wanted_by",
    "socket_config",
];
/// Keys allowed in `shared_dirs.<name>`.
pub const SHARED_DIR_KEYS: &[&str] = &["source", "target"];
/// Keys allowed in `firewall`.
pub const FIREWALL_KEYS: &[&str] = &["enable", "allowed_tcp_ports", "allowed_udp_ports"];
/// Accepted values of a service's `type`.
pub const SERVICE_TYPES: &[&str] = &[
    "simple",
    "exec",
    "forking",
    "oneshot",
    "dbus",
    "notify",
    "notify-reload",
    "idle",
];
/// Names the test driver defines as globals in the script; no node may take them.
pub const RESERVED_NAMES: &[&str] = &[
    "start_all",
    "join_all",
    "machines",
    "vlans",
    "driver",
    "log",
    "subtest",
    "retry",
    "polling_condition",
    "serial_stdout_on",
    "serial_stdout_off",
    "create_machine",
    "t",
    "test_script",
    "run_tests",
    "machines_qemu",
    "machines_nspawn",
    "os",
    "partition",
    "heal",
    "debug",
];
/// Error messages are one line (`file:line:col: message`): control characters from the
/// test file's values (a newline in a quoted string) are shown escaped.
fn one_line(message: String) -> String {
    if !message.chars().any(char::is_control) {
        return message;
    }
    message
        .chars()
        .map(|c| match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Python keywords (the lowercase ones; a node name cannot be any other).
pub const PYTHON_KEYWORDS: &[&str] = &[
    "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif",
    "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda",
    "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
];

/// Names from the NixOS options that a user may reach for, and the vmrig key they mean.
const NIXOS_ALIASES: &[(&str, &str)] = &[
    ("extraGroups", "groups"),
    ("isSystemUser", "system"),
    ("initialPassword", "password"),
    ("hashedPassword", "password"),
    ("memorySize", "memory"),
    ("cores", "cpus"),
    ("systemPackages", "packages"),
    ("environment.systemPackages", "packages"),
    ("testScript", "test_script"),
    ("serviceConfig", "service_config"),
    ("ExecStart", "exec_start"),
    ("allowedTCPPorts", "allowed_tcp_ports"),
    ("allowedUDPPorts", "allowed_udp_ports"),
];

/// A node or `[defaults]` before merging: lists are as written, scalars are optional.
#[derive(Debug, Default, Clone)]
pub(crate) struct Partial {
    packages: Vec<String>,
    local_debs: Vec<LocalDeb>,
    memory: Option<u32>,
    cpus: Option<u32>,
    vlans: Option<Vec<u8>>,
    graphics: Option<bool>,
    kernel_params: Vec<String>,
    users: BTreeMap<String, UserSpec>,
    files: BTreeMap<String, FileSpec>,
    services: BTreeMap<String, ServiceSpec>,
    sockets: BTreeMap<String, SocketSpec>,
    shared_dirs: BTreeMap<String, SharedDirSpec>,
    firewall_enable: Option<bool>,
    tcp: Vec<u16>,
    udp: Vec<u16>,
    setup: Vec<String>,
    suite: Option<String>,
    mirror: Option<String>,
    snapshot: Option<bool>,
    static_addresses: Option<bool>,
}

/// One entry of a table: its key, the key's place and its value.
#[derive(Clone, Copy)]
struct Field<'a> {
    name: &'a str,
    key: &'a Key,
    item: &'a Item,
}

impl Field<'_> {
    fn key_span(&self) -> Span {
        self.key.span().or_else(|| self.item.span())
    }
    fn value_span(&self) -> Span {
        self.item.span().or_else(|| self.key.span())
    }
}

struct Ctx<'a> {
    src: &'a str,
    path: &'a Path,
    /// Directory that relative paths in the file are resolved against.
    dir: PathBuf,
}

fn in_(within: &str) -> String {
    if within.is_empty() {
        String::new()
    } else {
        format!(" in {within}")
    }
}

fn article(type_name: &str) -> &'static str {
    match type_name {
        "string" => "a string",
        "integer" => "an integer",
        "float" => "a float",
        "boolean" => "a boolean",
        "datetime" => "a date-time",
        "array" => "an array",
        "inline table" | "table" => "a table",
        "array of tables" => "an array of tables",
        _ => "nothing",
    }
}

fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '-' {
            out.push('_');
        } else {
            out.push(c);
        }
    }
    out
}

/// The allowed key that `key` most likely meant, if any is close enough.
pub fn suggest(key: &str, allowed: &[&str]) -> Option<String> {
    if let Some((_, to)) = NIXOS_ALIASES
        .iter()
        .find(|(from, to)| *from == key && allowed.contains(to))
    {
        return Some(to.to_string());
    }
    let snake = snake_case(key);
    if snake != key && allowed.contains(&snake.as_str()) {
        return Some(snake);
    }
    let lower = key.to_ascii_lowercase();
    allowed
        .iter()
        .map(|c| (strsim::jaro_winkler(&lower, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

fn is_package_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(c))
}

fn is_node_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

fn is_user_name(s: &str) -> bool {
    let body = s.strip_suffix('$').unwrap_or(s);
    let b = body.as_bytes();
    !b.is_empty()
        && s.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn is_unit_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":_.@-\\".contains(&c))
}

fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn is_mode(s: &str) -> bool {
    (3..=4).contains(&s.len()) && s.bytes().all(|c| (b'0'..=b'7').contains(&c))
}

/// The Debian suites vmrig builds and boots (and tests): Debian 13 (the default) and 12.
pub const SUPPORTED_SUITES: &[&str] = &["trixie", "bookworm"];

fn supported_suites_help() -> String {
    format!(
        "supported suites: {} (Debian 13, the default, and Debian 12)",
        SUPPORTED_SUITES
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn is_suite(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_guest_path(s: &str) -> bool {
    s.starts_with('/') && s.len() > 1 && !s.ends_with('/') && !s.contains('\0')
}

impl<'a> Ctx<'a> {
    fn err(&self, kind: ErrorKind, span: Span, message: impl Into<String>) -> SpecError {
        SpecError::new(
            kind,
            self.path,
            Some(self.src),
            span,
            one_line(message.into()),
        )
    }

    /// The entries of `table`, refusing keys not in `allowed`.
    fn entries<'t>(
        &self,
        table: &'t dyn TableLike,
        allowed: &[&str],
        within: &str,
    ) -> Result<Vec<Field<'t>>> {
        let mut out = Vec::new();
        for (name, item) in table.iter() {
            if item.is_none() {
                continue;
            }
            let Some((key, item)) = table.get_key_value(name) else {
                continue;
            };
            let field = Field { name, key, item };
            if !allowed.contains(&name) {
                return Err(self.unknown_key(&field, allowed, within));
            }
            out.push(field);
        }
        Ok(out)
    }

    /// The entries of a table whose keys are names chosen by the user.
    fn named_entries<'t>(&self, table: &'t dyn TableLike) -> Vec<Field<'t>> {
        table
            .iter()
            .filter(|(_, item)| !item.is_none())
            .filter_map(|(name, _)| {
                table
                    .get_key_value(name)
                    .map(|(key, item)| Field { name, key, item })
            })
            .collect()
    }

    fn unknown_key(&self, f: &Field, allowed: &[&str], within: &str) -> SpecError {
        let suggestion = suggest(f.name, allowed);
        let place = if within.is_empty() {
            "unknown top-level key".to_string()
        } else {
            "unknown key".to_string()
        };
        let mut message = format!("{place} `{}`{}", f.name, in_(within));
        let help = if let Some(s) = &suggestion {
            message.push_str(&format!(" (did you mean `{s}`?)"));
            format!("did you mean `{s}`?")
        } else {
            format!("valid keys here: {}", allowed.join(", "))
        };
        let help = if !within.is_empty() && TOP_KEYS.contains(&f.name) {
            format!(
                "`{}` is a top-level key: TOML puts every key after a [table] header into that \
                 table, so write top-level keys before the first header",
                f.name
            )
        } else {
            help
        };
        self.err(ErrorKind::UnknownKey, f.key_span(), message)
            .label("unknown key")
            .help(help)
    }

    fn wrong_type(&self, f: &Field, name: &str, within: &str, expected: &str) -> SpecError {
        self.wrong_type_at(f.value_span(), f.item.type_name(), name, within, expected)
    }

    fn wrong_type_at(
        &self,
        span: Span,
        found: &str,
        name: &str,
        within: &str,
        expected: &str,
    ) -> SpecError {
        self.err(
            ErrorKind::WrongType,
            span,
            format!(
                "wrong type for `{name}`{}: expected {expected}, found {}",
                in_(within),
                article(found)
            ),
        )
        .label(format!("expected {expected}"))
        .help(format!("`{name}` takes {expected}"))
    }

    fn invalid(
        &self,
        span: Span,
        message: impl Into<String>,
        label: &str,
        help: impl Into<String>,
    ) -> SpecError {
        self.err(ErrorKind::Invalid, span, message)
            .label(label)
            .help(help)
    }

    fn string(&self, f: &Field, within: &str) -> Result<String> {
        match f.item.as_str() {
            Some(s) => Ok(s.to_string()),
            None => Err(self.wrong_type(f, f.name, within, "a string")),
        }
    }

    fn boolean(&self, f: &Field, within: &str) -> Result<bool> {
        match f.item.as_bool() {
            Some(b) => Ok(b),
            None => Err(self
                .wrong_type(f, f.name, within, "a boolean")
                .help("write `true` or `false`, without quotes")),
        }
    }

    fn integer(&self, f: &Field, within: &str) -> Result<i64> {
        match f.item.as_integer() {
            Some(i) => Ok(i),
            None => Err(self.wrong_type(f, f.name, within, "an integer")),
        }
    }

    /// An integer in `min..=max`; `unit` follows the number in the message.
    fn int_in(&self, f: &Field, within: &str, min: i64, max: i64, unit: &str) -> Result<i64> {
        let i = self.integer(f, within)?;
        if i < min || i > max {
            let (why, label) = if max == i64::MAX {
                (
                    format!("{i}{unit} is below the minimum of {min}{unit}"),
                    format!("must be at least {min}"),
                )
            } else {
                (
                    format!("{i}{unit} is out of range ({min}..={max})"),
                    format!("must be between {min} and {max}"),
                )
            };
            return Err(self.invalid(
                f.value_span(),
                format!("invalid `{}`{}: {why}", f.name, in_(within)),
                &label,
                format!("`{}` takes a whole number from {min} to {max}", f.name),
            ));
        }
        Ok(i)
    }

    fn array<'t>(&self, f: &Field<'t>, within: &str, of: &str) -> Result<&'t toml_edit::Array> {
        match f.item.as_array() {
            Some(a) => Ok(a),
            None => Err(self
                .wrong_type(f, f.name, within, &format!("an array of {of}"))
                .help(format!("write a list, e.g. `{} = [...]`", f.name))),
        }
    }

    /// [`Ctx::string_list`] without the places.
    fn strings(&self, f: &Field, within: &str) -> Result<Vec<String>> {
        Ok(self
            .string_list(f, within)?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    fn string_list(&self, f: &Field, within: &str) -> Result<Vec<(String, Span)>> {
        let arr = self.array(f, within, "strings")?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some(s) => Ok((s.to_string(), v.span())),
                None => Err(self.wrong_type_at(
                    v.span(),
                    v.type_name(),
                    &format!("{}[{i}]", f.name),
                    within,
                    "a string",
                )),
            })
            .collect()
    }

    fn int_list(&self, f: &Field, within: &str) -> Result<Vec<(i64, Span)>> {
        let arr = self.array(f, within, "integers")?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v.as_integer() {
                Some(n) => Ok((n, v.span())),
                None => Err(self.wrong_type_at(
                    v.span(),
                    v.type_name(),
                    &format!("{}[{i}]", f.name),
                    within,
                    "an integer",
                )),
            })
            .collect()
    }

    fn table<'t>(&self, f: &Field<'t>, name: &str, within: &str) -> Result<&'t dyn TableLike> {
        match f.item.as_table_like() {
            Some(t) => Ok(t),
            None => Err(self.wrong_type(f, name, within, "a table")),
        }
    }

    /// A `packages` list: archive package names, and (where `files_allowed`: a node's or
    /// `[defaults]`'s list) local package files, checked and hashed here.
    fn packages(
        &self,
        f: &Field,
        within: &str,
        files_allowed: bool,
    ) -> Result<(Vec<String>, Vec<LocalDeb>)> {
        let list = self.string_list(f, within)?;
        let (mut names, mut debs) = (Vec::new(), Vec::new());
        for (p, span) in list {
            if crate::local_deb::is_local_path(&p) {
                debs.push(self.local_deb(&p, span, within, files_allowed)?);
                continue;
            }
            if !is_package_name(&p) {
                let hint = if p.ends_with(".deb") {
                    "; a local package file is a path: `./` + its path from the test file"
                } else {
                    ""
                };
                return Err(self.invalid(
                    span.clone(),
                    format!("invalid package name `{p}`{}", in_(within)),
                    "not a Debian package name",
                    format!(
                        "Debian package names are lowercase letters, digits, `+`, `-` and `.`, \
                         at least two characters, starting with a letter or digit{hint}"
                    ),
                ));
            }
            names.push(p);
        }
        Ok((names, debs))
    }

    /// A local package file `written` in `packages` at `span`: it must be a `.deb` that
    /// exists and is a Debian package.
    fn local_deb(
        &self,
        written: &str,
        span: Span,
        within: &str,
        files_allowed: bool,
    ) -> Result<LocalDeb> {
        if !files_allowed {
            return Err(self.invalid(
                span,
                format!("local package file `{written}`{}", in_(within)),
                "a file in a user's packages",
                "install local package files through the node's `packages` (a user's \
                 `packages` take archive packages only)",
            ));
        }
        if !written.ends_with(".deb") {
            return Err(self.invalid(
                span,
                format!("`{written}`{} is a path but not a `.deb` file", in_(within)),
                "not a .deb file",
                "a path in `packages` names a Debian package file ending in `.deb`; an \
                 archive package is named without `./` or `/`",
            ));
        }
        let joined = self.dir.join(written);
        let path = std::path::absolute(&joined).unwrap_or(joined);
        let sha256 = crate::local_deb::check_deb(&path).map_err(|problem| {
            let (kind, label) = match problem {
                crate::DebProblem::Unreadable(_) => (ErrorKind::Io, "file not found"),
                _ => (ErrorKind::Invalid, "not a Debian package"),
            };
            self.err(
                kind,
                span,
                format!(
                    "local package `{written}`{}: {}: {problem}",
                    in_(within),
                    path.display()
                ),
            )
            .label(label)
            .help(
                "the path is relative to the directory of the test file; build the package \
                 first (`dpkg-deb --build --root-owner-group DIR FILE.deb`)",
            )
        })?;
        Ok(LocalDeb {
            written: written.to_string(),
            path,
            sha256,
        })
    }

    fn ports(&self, f: &Field, within: &str) -> Result<Vec<u16>> {
        let list = self.int_list(f, within)?;
        list.into_iter()
            .map(|(p, span)| {
                u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                    self.invalid(
                        span,
                        format!("invalid port {p} in `{}`{}", f.name, in_(within)),
                        "ports are 1..=65535",
                        "a port is a number from 1 to 65535",
                    )
                })
            })
            .collect()
    }

    fn node(&self, table: &dyn TableLike, within: &str) -> Result<Partial> {
        let mut n = Partial::default();
        for f in self.entries(table, NODE_KEYS, within)? {
            match f.name {
                "packages" => (n.packages, n.local_debs) = self.packages(&f, within, true)?,
                "memory" => {
                    let m = self.integer(&f, within)?;
                    if m < i64::from(MIN_MEMORY) || m > i64::from(u32::MAX) {
                        return Err(self.invalid(
                            f.value_span(),
                            format!(
                                "invalid `memory`{}: {m} MiB is below the minimum of \
                                     {MIN_MEMORY} MiB",
                                in_(within)
                            ),
                            "at least 128 (MiB)",
                            "`memory` is in MiB, e.g. `memory = 2048` for 2 GiB",
                        ));
                    }
                    n.memory = Some(m as u32);
                }
                "cpus" => n.cpus = Some(self.int_in(&f, within, 1, 1024, "")? as u32),
                "vlans" => {
                    let mut vlans: Vec<u8> = Vec::new();
                    for (v, span) in self.int_list(&f, within)? {
                        let Some(v) = u8::try_from(v).ok().filter(|v| *v != 0) else {
                            return Err(self.invalid(
                                span,
                                format!("invalid VLAN {v}{}: VLANs are 1..=255", in_(within)),
                                "VLANs are 1..=255",
                                "VLAN numbers are 1 to 255",
                            ));
                        };
                        if vlans.contains(&v) {
                            return Err(self.invalid(
                                span,
                                format!("VLAN {v} is listed twice{}", in_(within)),
                                "duplicate VLAN",
                                "list each VLAN once",
                            ));
                        }
                        vlans.push(v);
                    }
                    n.vlans = Some(vlans);
                }
                "graphics" => n.graphics = Some(self.boolean(&f, within)?),
                "kernel_params" => {
                    n.kernel_params = self
                        .string_list(&f, within)?
                        .into_iter()
                        .map(|(s, _)| s)
                        .collect()
                }
                "setup" => {
                    n.setup = self
                        .string_list(&f, within)?
                        .into_iter()
                        .map(|(s, _)| s)
                        .collect()
                }
                "suite" => {
                    let s = self.string(&f, within)?;
                    if !is_suite(&s) {
                        return Err(self.invalid(
                            f.value_span(),
                            format!("invalid `suite` `{s}`{}", in_(within)),
                            "expected a Debian suite name such as `trixie`",
                            supported_suites_help(),
                        ));
                    }
                    if !SUPPORTED_SUITES.contains(&s.as_str()) {
                        let hint = match suggest(&s, SUPPORTED_SUITES) {
                            Some(sug) => format!(" (did you mean `{sug}`?)"),
                            None => String::new(),
                        };
                        return Err(self.invalid(
                            f.value_span(),
                            format!("unsupported `suite` `{s}`{}{hint}", in_(within)),
                            "not a suite vmrig supports",
                            supported_suites_help(),
                        ));
                    }
                    n.suite = Some(s);
                }
                "mirror" => {
                    let s = self.string(&f, within)?;
                    if !s.contains("://") || s.chars().any(char::is_whitespace) {
                        return Err(self.invalid(
                            f.value_span(),
                            format!("invalid `mirror` `{s}`{}: expected a URL", in_(within)),
                            "expected a URL such as file:///srv/mirror or http://<your mirror>/debian",
                            "`mirror` is the URL of a Debian mirror you run or choose, e.g. `http://<your mirror>/debian`",
                        ));
                    }
                    n.mirror = Some(s);
                }
                "snapshot" => n.snapshot = Some(self.boolean(&f, within)?),
                "static_addresses" => n.static_addresses = Some(self.boolean(&f, within)?),
                "users" => {
                    let t = self.table(&f, "users", within)?;
                    for u in self.named_entries(t) {
                        if !is_user_name(u.name) {
                            return Err(self.invalid(
                                u.key_span(),
                                format!("invalid user name `{}`{}", u.name, in_(within)),
                                "not a user name",
                                "user names match [a-z_][a-z0-9_-]*, at most 32 characters",
                            ));
                        }
                        let uw = format!("user `{}` of {within}", u.name);
                        let ut = self.table(&u, &format!("users.{}", u.name), within)?;
                        n.users.insert(u.name.to_string(), self.user(ut, &uw)?);
                    }
                }
                "files" => {
                    let t = self.table(&f, "files", within)?;
                    for e in self.named_entries(t) {
                        if !is_guest_path(e.name) {
                            let why = if e.name.starts_with('/') {
                                "is not a file path"
                            } else {
                                "is not absolute"
                            };
                            return Err(self.invalid(
                                e.key_span(),
                                format!("file path `{}`{} {why}", e.name, in_(within)),
                                "must be an absolute guest path",
                                "write the full path in the guest, e.g. `files.\"/etc/motd\"`",
                            ));
                        }
                        let fw = format!("file `{}` of {within}", e.name);
                        let ft = self.table(&e, &format!("files.\"{}\"", e.name), within)?;
                        let spec = self.file(ft, &e, &fw)?;
                        n.files.insert(e.name.to_string(), spec);
                    }
                }
                "services" => {
                    let t = self.table(&f, "services", within)?;
                    for e in self.named_entries(t) {
                        if !is_unit_name(e.name) {
                            return Err(self.invalid(
                                e.key_span(),
                                format!("invalid service name `{}`{}", e.name, in_(within)),
                                "not a systemd unit name",
"unit names are letters, digits and `:_.@-`, e.g. `web` or `web.service`",
                            ));
                        }
                        let sw = format!("service `{}` of {within}", e.name);
                        let st = self.table(&e, &format!("services.{}", e.name), within)?;
                        let spec = self.service(st, &e, &sw)?;
                        n.services.insert(e.name.to_string(), spec);
                    }
                }
                "sockets" => {
                    let t = self.table(&f, "sockets", within)?;
                    for e in self.named_entries(t) {
                        let name = e.name.strip_suffix(".socket").unwrap_or(e.name);
                        if !is_unit_name(name) || name.contains('@') {
                            return Err(self.invalid(
                                e.key_span(),
                                format!("invalid socket name `{}`{}", e.name, in_(within)),
                                "not a systemd socket unit name",
"socket names are letters, digits and `:_.-`, e.g. `rsync` (the unit rsync.socket)",
                            ));
                        }
                        let sw = format!("socket `{}` of {within}", e.name);
                        let st = self.table(&e, &format!("sockets.{}", e.name), within)?;
                        let spec = self.socket(st, &sw)?;
                        n.sockets.insert(name.to_string(), spec);
                    }
                }
                "shared_dirs" => {
                    let t = self.table(&f, "shared_dirs", within)?;
                    for e in self.named_entries(t) {
                        if !is_shared_dir_name(e.name) {
                            return Err(self.invalid(
                                e.key_span(),
                                format!("invalid shared directory name `{}`{}", e.name, in_(within)),
                                "not a shared directory name",
                                "names are 1 to 20 lower-case letters, digits, `_` or `-`, e.g. `results`",
                            ));
                        }
                        let dw = format!("shared directory `{}` of {within}", e.name);
                        let dt = self.table(&e, &format!("shared_dirs.{}", e.name), within)?;
                        let spec = self.shared_dir(dt, &e, &dw)?;
                        n.shared_dirs.insert(e.name.to_string(), spec);
                    }
                }
                "firewall" => {
                    let t = self.table(&f, "firewall", within)?;
                    let fw = format!("`firewall` of {within}");
                    for e in self.entries(t, FIREWALL_KEYS, &fw)? {
                        match e.name {
                            "enable" => n.firewall_enable = Some(self.boolean(&e, &fw)?),
                            "allowed_tcp_ports" => n.tcp = self.ports(&e, &fw)?,
                            _ => n.udp = self.ports(&e, &fw)?,
                        }
                    }
                }
                _ => unreachable!("key checked against NODE_KEYS"),
            }
        }
        Ok(n)
    }

    fn user(&self, table: &dyn TableLike, within: &str) -> Result<UserSpec> {
        let mut u = UserSpec::default();
        for f in self.entries(table, USER_KEYS, within)? {
            match f.name {
                "uid" => {
                    u.uid = Some(self.int_in(&f, within, 0, i64::from(u32::MAX) - 1, "")? as u32)
                }
                "groups" => {
                    for (g, span) in self.string_list(&f, within)? {
                        if !is_user_name(&g) {
                            return Err(self.invalid(
                                span,
                                format!("invalid group name `{g}`{}", in_(within)),
                                "not a group name",
                                "group names match [a-z_][a-z0-9_-]*, at most 32 characters",
                            ));
                        }
                        u.groups.push(g);
                    }
                }
                "shell" => u.shell = Some(self.string(&f, within)?),
                "password" => u.password = Some(self.string(&f, within)?),
                "system" => u.system = self.boolean(&f, within)?,
                "home" => {
                    let h = self.string(&f, within)?;
                    if !h.starts_with('/') {
                        return Err(self.invalid(
                            f.value_span(),
                            format!("`home` `{h}`{} is not absolute", in_(within)),
                            "must be an absolute path",
                            "write the full path, e.g. `/home/alice`",
                        ));
                    }
                    u.home = Some(h);
                }
                _ => u.packages = self.packages(&f, within, false)?.0,
            }
        }
        Ok(u)
    }

    fn file(&self, table: &dyn TableLike, entry: &Field, within: &str) -> Result<FileSpec> {
        let mut spec = FileSpec::default();
        let mut source_key: Option<Span> = None;
        let mut text_key: Option<Span> = None;
        let mut mode_key: Option<Span> = None;
        let mut source_dir = false;
        for f in self.entries(table, FILE_KEYS, within)? {
            match f.name {
                "text" => {
                    spec.text = Some(self.string(&f, within)?);
                    text_key = Some(f.key_span());
                }
                "source" => {
                    let s = self.string(&f, within)?;
                    let joined = self.dir.join(&s);
                    let resolved = std::path::absolute(&joined).unwrap_or(joined);
                    let meta = match std::fs::metadata(&resolved) {
                        Ok(meta) => meta,
                        Err(e) => {
                            return Err(self
                                .err(
                                    ErrorKind::Io,
                                    f.value_span(),
                                    format!(
                                        "cannot read `source` of {within}: {}: {e}",
                                        resolved.display()
                                    ),
                                )
                                .label("file not found")
                                .help("`source` is relative to the directory of the test file"));
                        }
                    };
                    if let Some(what) = crate::source::special_kind(meta.file_type()) {
                        return Err(self.invalid(
                            f.value_span(),
                            format!("cannot copy `source` of {within}: {s} is {what}"),
                            "not a file or directory",
                            "`source` names a regular file or a directory",
                        ));
                    }
                    if meta.is_dir() {
                        self.source_tree(&s, &resolved, &f, within)?;
                        source_dir = true;
                    }
                    spec.source = Some(resolved);
                    source_key = Some(f.key_span());
                }
                "mode" => {
                    let Some(m) = f.item.as_str() else {
                        return Err(self
                            .wrong_type(&f, "mode", within, "a string")
                            .help("write the mode as an octal string, e.g. `mode = \"0644\"`"));
                    };
                    if !is_mode(m) {
                        return Err(self.invalid(
                            f.value_span(),
                            format!("invalid `mode` `{m}`{}", in_(within)),
                            "expected 3 or 4 octal digits",
                            "write the mode as an octal string, e.g. `mode = \"0644\"`",
                        ));
                    }
                    spec.mode = Some(m.to_string());
                    mode_key = Some(f.key_span());
                }
                "owner" => spec.owner = Some(self.string(&f, within)?),
                _ => spec.group = Some(self.string(&f, within)?),
            }
        }
        if let (true, Some(mode), None) = (source_dir, mode_key, &text_key) {
            return Err(self
                .err(
                    ErrorKind::Conflict,
                    mode,
                    format!("`mode` is set for a directory `source`{}", in_(within)),
                )
                .label("a copied directory keeps its modes")
                .help("remove `mode`: the tree keeps the modes it has on the host (`chmod` them there)"));
        }
        match (text_key, source_key) {
            (Some(_), Some(src)) => Err(self
                .err(
                    ErrorKind::Conflict,
                    src,
                    format!("both `text` and `source` are set{}", in_(within)),
                )
                .label("second content")
                .help("give the file's content once: `text` or `source`")),
            (None, None) => Err(self
                .err(
                    ErrorKind::Missing,
                    entry.key_span(),
                    format!("{within} has neither `text` nor `source`"),
                )
                .label("no content")
                .help("add `text = \"...\"` or `source = \"relative/path\"`")),
            _ => Ok(spec),
        }
    }

    fn shared_dir(
        &self,
        table: &dyn TableLike,
        entry: &Field,
        within: &str,
    ) -> Result<SharedDirSpec> {
        let (mut source, mut target) = (None, None);
        for f in self.entries(table, SHARED_DIR_KEYS, within)? {
            let s = self.string(&f, within)?;
            if f.name == "target" {
                if !s.starts_with('/') {
                    return Err(self.invalid(
                        f.value_span(),
                        format!("`target` `{s}` of {within} is not absolute"),
                        "must be an absolute guest path",
                        "write where the guest sees the directory, e.g. `target = \"/mnt/shared\"`",
                    ));
                }
                target = Some(s);
                continue;
            }
            let joined = self.dir.join(&s);
            let resolved = std::path::absolute(&joined).unwrap_or(joined);
            if !resolved.is_dir() {
                let why = match std::fs::metadata(&resolved) {
                    Ok(_) => "is not a directory".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(self
                    .err(
                        ErrorKind::Io,
                        f.value_span(),
                        format!(
                            "`source` of {within}: {}: {why}",
                            resolved.display()
                        ),
                    )
                    .label("not a directory")
                    .help("`source` is a host directory, relative to the directory of the test file: create it or fix the path"));
            }
            source = Some(resolved);
        }
        match (source, target) {
            (Some(source), Some(target)) => Ok(SharedDirSpec { source, target }),
            (source, _) => {
                let missing = if source.is_none() { "source" } else { "target" };
                Err(self
                    .err(
                        ErrorKind::Missing,
                        entry.key_span(),
                        format!("{within} has no `{missing}`"),
                    )
                    .label("incomplete")
                    .help("give both: `source = \"host/dir\"` and `target = \"/guest/dir\"`"))
            }
        }
    }

    /// Checks the tree of the directory `source` `written` (at `resolved`): only files,
    /// directories and symlinks, every name UTF-8, every directory readable.
    fn source_tree(&self, written: &str, resolved: &Path, f: &Field, within: &str) -> Result<()> {
        let shown = |rel: &str| Path::new(written).join(rel).display().to_string();
        match crate::source::source_tree(resolved) {
            Ok(_) => Ok(()),
            Err(SourceError::Special { rel, what }) => Err(self.invalid(
                f.value_span(),
                format!("cannot copy `source` of {within}: {} is {what}", shown(&rel)),
                "special file in this directory",
                format!(
                    "a directory `source` may hold only files, directories and symlinks: remove {} from it",
                    shown(&rel)
                ),
            )),
            Err(SourceError::NotUtf8 { rel }) => Err(self.invalid(
                f.value_span(),
                format!(
                    "cannot copy `source` of {within}: {} has a name or link target that is not UTF-8",
                    shown(&rel)
                ),
                "name that is not UTF-8 in this directory",
                "rename it (or remove it from the directory)",
            )),
            Err(SourceError::Io { path, err }) => Err(self
                .err(
                    ErrorKind::Io,
                    f.value_span(),
                    format!("cannot read `source` of {within}: {}: {err}", path.display()),
                )
                .label("unreadable directory")
                .help("make the directory and everything in it readable")),
        }
    }

    fn service(&self, table: &dyn TableLike, entry: &Field, within: &str) -> Result<ServiceSpec> {
        let mut s = ServiceSpec {
            enable: true,
            script: None,
            exec_start: None,
            wanted_by: Vec::new(),
            after: Vec::new(),
            requires: Vec::new(),
            user: None,
            environment: BTreeMap::new(),
            type_: None,
            service_config: BTreeMap::new(),
        };
        let mut wanted_by = None;
        let mut first_cmd: Option<&str> = None;
        let strings = |f: &Field| self.strings(f, within);
        for f in self.entries(table, SERVICE_KEYS, within)? {
            match f.name {
                "enable" => s.enable = self.boolean(&f, within)?,
                "script" | "exec_start" => {
                    let v = self.string(&f, within)?;
                    if let Some(other) = first_cmd {
                        return Err(self
                            .err(
                                ErrorKind::Conflict,
                                f.key_span(),
                                format!(
                                    "both `{other}` and `{}` are set{}",
                                    f.name,
                                    in_(within)
                                ),
                            )
                            .label("second command")
                            .help("a service runs either a shell `script` or one `exec_start` command"));
                    }
                    first_cmd = Some(f.name);
                    if f.name == "script" {
                        s.script = Some(v);
                    } else {
                        s.exec_start = Some(v);
                    }
                }
                "wanted_by" => wanted_by = Some(strings(&f)?),
                "after" => s.after = strings(&f)?,
                "requires" => s.requires = strings(&f)?,
                "user" => s.user = Some(self.string(&f, within)?),
                "type" => {
                    let t = self.string(&f, within)?;
                    if !SERVICE_TYPES.contains(&t.as_str()) {
                        let help = match suggest(&t, SERVICE_TYPES) {
                            Some(sug) => format!("did you mean `{sug}`?"),
                            None => format!("one of: {}", SERVICE_TYPES.join(", ")),
                        };
                        return Err(self.invalid(
                            f.value_span(),
                            format!("invalid service `type` `{t}`{}", in_(within)),
                            "not a systemd service type",
                            help,
                        ));
                    }
                    s.type_ = Some(t);
                }
                "environment" => {
                    let t = self.table(&f, "environment", within)?;
                    for e in self.named_entries(t) {
                        if !is_env_name(e.name) {
                            return Err(self.invalid(
                                e.key_span(),
                                format!(
                                    "invalid environment variable name `{}`{}",
                                    e.name,
                                    in_(within)
                                ),
                                "not a variable name",
                                "environment variable names match [A-Za-z_][A-Za-z0-9_]*",
                            ));
                        }
                        let name = format!("environment.{}", e.name);
                        let v = match e.item.as_value().and_then(scalar_string) {
                            Some(v) => v,
                            None => {
                                return Err(self.wrong_type(
                                    &e,
                                    &name,
                                    within,
                                    "a string, number or boolean",
                                ))
                            }
                        };
                        s.environment.insert(e.name.to_string(), v);
                    }
                }
                _ => {
                    s.service_config =
                        self.unit_settings(&f, "service_config", "Service", within)?
                }
            }
        }
        // A template (`web@`) runs as instances (of a socket with `accept`, or named
        // elsewhere): it is not enabled itself unless `wanted_by` says so.
        let template = ServiceSpec::unit_name(entry.name).contains("@.");
        s.wanted_by = match wanted_by {
            Some(w) => w,
            None if s.is_new() && !template => vec![DEFAULT_WANTED_BY.to_string()],
            None => Vec::new(),
        };
        Ok(s)
    }
}

impl Ctx<'_> {
    fn socket(&self, table: &dyn TableLike, within: &str) -> Result<SocketSpec> {
        let mut s = SocketSpec {
            enable: true,
            listen_streams: Vec::new(),
            listen_datagrams: Vec::new(),
            accept: false,
            wanted_by: vec!["sockets.target".to_string()],
            socket_config: BTreeMap::new(),
        };
        let strings = |f: &Field| self.strings(f, within);
        for f in self.entries(table, SOCKET_KEYS, within)? {
            match f.name {
                "enable" => s.enable = self.boolean(&f, within)?,
                "listen_streams" => s.listen_streams = strings(&f)?,
                "listen_datagrams" => s.listen_datagrams = strings(&f)?,
                "accept" => s.accept = self.boolean(&f, within)?,
                "wanted_by" => s.wanted_by = strings(&f)?,
                _ => s.socket_config = self.unit_settings(&f, "socket_config", "Socket", within)?,
            }
        }
        Ok(s)
    }

    /// Raw unit-file settings of one section (`service_config`, `socket_config`): keys as
    /// in a unit file, values scalars or arrays of them (a setting given several times).
    fn unit_settings(
        &self,
        f: &Field,
        key: &str,
        section: &str,
        within: &str,
    ) -> Result<BTreeMap<String, ServiceConfigValue>> {
        let mut out_map = BTreeMap::new();
        let t = self.table(f, key, within)?;
        for e in self.named_entries(t) {
            let name = format!("{key}.{}", e.name);
            if !e.name.bytes().all(|c| c.is_ascii_alphanumeric())
                || !e.name.starts_with(|c: char| c.is_ascii_uppercase())
            {
                return Err(self.invalid(
                    e.key_span(),
                    format!(
                        "invalid `[{section}]` setting name `{}`{}",
                        e.name,
                        in_(within)
                    ),
                    "expected a systemd setting such as `Restart`",
                    format!("`{key}` keys are written as in a unit file, e.g. `RestartSec`"),
                ));
            }
            let expected = "a string, number, boolean or an array of them";
            let v = match e.item.as_value() {
                Some(Value::Array(a)) => {
                    let mut out = Vec::new();
                    for (i, v) in a.iter().enumerate() {
                        match scalar_string(v) {
                            Some(s) => out.push(s),
                            None => {
                                return Err(self.wrong_type_at(
                                    v.span(),
                                    v.type_name(),
                                    &format!("{name}[{i}]"),
                                    within,
                                    "a string, number or boolean",
                                ))
                            }
                        }
                    }
                    ServiceConfigValue::Many(out)
                }
                Some(v) => match scalar_string(v) {
                    Some(s) => ServiceConfigValue::One(s),
                    None => return Err(self.wrong_type(&e, &name, within, expected)),
                },
                None => return Err(self.wrong_type(&e, &name, within, expected)),
            };
            out_map.insert(e.name.to_string(), v);
        }
        Ok(out_map)
    }
}

/// A scalar TOML value as the string systemd would read.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        Value::Boolean(b) => Some(b.value().to_string()),
        _ => None,
    }
}

/// Append `extra` to `base`, keeping the first occurrence of each item.
fn concat_dedup<T: PartialEq + Clone>(base: &[T], extra: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(base.len() + extra.len());
    for x in base.iter().chain(extra) {
        if !out.contains(x) {
            out.push(x.clone());
        }
    }
    out
}

/// The default's entries, replaced or extended by the node's.
fn map<T: Clone>(d: &BTreeMap<String, T>, n: BTreeMap<String, T>) -> BTreeMap<String, T> {
    let mut m = d.clone();
    m.extend(n);
    m
}

/// Merge `[defaults]` into a node; see the crate documentation for the rules.
pub(crate) fn merge(name: &str, d: &Partial, n: Partial) -> NodeSpec {
    NodeSpec {
        name: name.to_string(),
        packages: concat_dedup(&d.packages, &n.packages),
        local_debs: concat_dedup(&d.local_debs, &n.local_debs),
        memory: n.memory.or(d.memory).unwrap_or(DEFAULT_MEMORY),
        cpus: n.cpus.or(d.cpus).unwrap_or(DEFAULT_CPUS),
        vlans: n
            .vlans
            .or_else(|| d.vlans.clone())
            .unwrap_or_else(|| vec![1]),
        graphics: n.graphics.or(d.graphics).unwrap_or(false),
        kernel_params: [d.kernel_params.as_slice(), &n.kernel_params].concat(),
        users: map(&d.users, n.users),
        files: map(&d.files, n.files),
        services: map(&d.services, n.services),
        sockets: map(&d.sockets, n.sockets),
        shared_dirs: map(&d.shared_dirs, n.shared_dirs),
        firewall: FirewallSpec {
            enable: n.firewall_enable.or(d.firewall_enable),
            allowed_tcp_ports: concat_dedup(&d.tcp, &n.tcp),
            allowed_udp_ports: concat_dedup(&d.udp, &n.udp),
        },
        setup: [d.setup.as_slice(), &n.setup].concat(),
        suite: n
            .suite
            .or_else(|| d.suite.clone())
            .unwrap_or_else(|| DEFAULT_SUITE.to_string()),
        mirror: n.mirror.or_else(|| d.mirror.clone()),
        snapshot: n.snapshot.or(d.snapshot).unwrap_or(true),
        static_addresses: n.static_addresses.or(d.static_addresses).unwrap_or(true),
    }
}

/// Line and column (1-based) at which the text of the string value at `span` starts.
fn string_start(src: &str, span: &Range<usize>) -> (usize, usize) {
    let (line, column) = crate::error::line_col(src, span.start);
    let raw = src.get(span.start..).unwrap_or("");
    let multiline = raw.starts_with("'''") || raw.starts_with("\"\"\"");
    if multiline && (raw[3..].starts_with('\n') || raw[3..].starts_with("\r\n")) {
        (line + 1, 1)
    } else if multiline {
        (line, column + 3)
    } else {
        (line, column + 1)
    }
}

/// Parses a test file; without `script_required`, a file without a test script is a test
/// with an empty one (its machines are driven from elsewhere: the Rust API).
pub(crate) fn parse(text: &str, path: &Path, script_required: bool) -> Result<TestSpec> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let cx = Ctx {
        src: text,
        path,
        dir,
    };
    let doc = ImDocument::parse(text).map_err(|e| {
        let msg = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        cx.err(ErrorKind::Syntax, e.span(), format!("invalid TOML: {msg}"))
            .label("here")
            .help("see https://toml.io for the syntax")
    })?;
    let root = doc.as_table();

    let mut name = None;
    let mut inline_script: Option<(String, Span, Span)> = None;
    let mut script_file: Option<(String, Span, Span)> = None;
    let mut global_timeout = DEFAULT_GLOBAL_TIMEOUT;
    let mut defaults = Partial::default();
    let mut nodes: Vec<(String, Partial)> = Vec::new();

    for f in cx.entries(root, TOP_KEYS, "")? {
        match f.name {
            "name" => {
                let s = cx.string(&f, "")?;
                if s.trim().is_empty() || s.contains('\n') {
                    return Err(cx.invalid(
                        f.value_span(),
                        "invalid `name`: it must be one non-empty line",
                        "empty or multi-line name",
                        "give the test a short name, e.g. `name = \"client-server\"`",
                    ));
                }
                name = Some(s);
            }
            "test_script" => {
                inline_script = Some((cx.string(&f, "")?, f.key_span(), f.value_span()));
            }
            "test_script_file" => {
                script_file = Some((cx.string(&f, "")?, f.key_span(), f.value_span()));
            }
            "global_timeout" => {
                global_timeout = cx.int_in(&f, "", 1, i64::MAX, " s")? as u64;
            }
            "defaults" => {
                let t = cx.table(&f, "defaults", "")?;
                defaults = cx.node(t, "`defaults`")?;
            }
            _ => {
                let t = cx.table(&f, "nodes", "")?;
                for e in cx.named_entries(t) {
                    check_node_name(&cx, &e)?;
                    check_node_name_is_unique(&cx, &e, nodes.iter().map(|(n, _)| n.as_str()))?;
                    let within = format!("node `{}`", e.name);
                    let nt = cx.table(&e, &format!("nodes.{}", e.name), "")?;
                    nodes.push((e.name.to_string(), cx.node(nt, &within)?));
                }
            }
        }
    }

    let Some(name) = name else {
        return Err(SpecError::new(
            ErrorKind::Missing,
            path,
            Some(text),
            None,
            "missing top-level key `name`",
        )
        .help("add `name = \"my-test\"` at the top of the file, before any [table] header"));
    };
    let script =
        match (inline_script, script_file) {
            (None, None) if !script_required => ScriptSource {
                text: String::new(),
                filename: path.to_path_buf(),
                first_line: 1,
                first_column: 1,
            },
            (None, None) => return Err(SpecError::new(
                ErrorKind::Missing,
                path,
                Some(text),
                None,
                "missing test script: set `test_script` or `test_script_file`",
            )
            .help(
                "add `test_script = '''...'''` (or `test_script_file = \"test.py\"`) at the top \
                 of the file, before any [table] header",
            )),
            (Some(_), Some((_, key, _))) => {
                return Err(cx
                    .err(
                        ErrorKind::Conflict,
                        key,
                        "both `test_script` and `test_script_file` are set",
                    )
                    .label("second script")
                    .help("keep one of them"))
            }
            (Some((text_, _, value)), None) => {
                let (first_line, first_column) = value.map_or((1, 1), |s| string_start(text, &s));
                ScriptSource {
                    text: text_,
                    filename: path.to_path_buf(),
                    first_line,
                    first_column,
                }
            }
            (None, Some((file, _, value))) => {
                let filename = cx.dir.join(&file);
                // A regular file only: a device (/dev/zero) or FIFO would never end.
                let regular = std::fs::metadata(&filename).and_then(|m| {
                    if m.is_file() {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                });
                let content = regular
                    .and_then(|()| std::fs::read_to_string(&filename))
                    .map_err(|e| {
                        cx.err(
                            ErrorKind::Io,
                            value,
                            format!("cannot read `test_script_file` {}: {e}", filename.display()),
                        )
                        .label("cannot read this file")
                        .help("`test_script_file` is relative to the directory of the test file")
                    })?;
                ScriptSource {
                    text: content,
                    filename,
                    first_line: 1,
                    first_column: 1,
                }
            }
        };
    // No nodes is a test too (upstream's retry.nix has `nodes = { }`): its script runs
    // with no machines, and no image is built.
    let nodes = nodes
        .into_iter()
        .map(|(n, p)| (n.clone(), merge(&n, &defaults, p)))
        .collect();
    Ok(TestSpec {
        name,
        path: path.to_path_buf(),
        script,
        global_timeout,
        nodes,
        places: crate::Places::of(text, root),
    })
}

/// Two nodes must not share a Python variable (`a-b`, `a_b`) or a host name (`ab`, `a_b`).
fn check_node_name_is_unique<'n>(
    cx: &Ctx,
    e: &Field,
    mut earlier: impl Iterator<Item = &'n str>,
) -> Result<()> {
    let clash = earlier.find(|other| {
        python_name(other) == python_name(e.name) || host_name(other) == host_name(e.name)
    });
    match clash {
        Some(other) => Err(cx.invalid(
            e.key_span(),
            format!(
                "invalid node name `{}`: node `{other}` has the same Python variable or host name",
                e.name
            ),
            "clashes with another node",
            "the script sees `-` as `_`, and host names drop `_`; rename one of the two nodes",
        )),
        None => Ok(()),
    }
}

fn check_node_name(cx: &Ctx, e: &Field) -> Result<()> {
    let name = e.name;
    let span = e.key_span();
    let help = "node names are lowercase letters, digits, `-` and `_`, starting with a letter, at \
                most 63 characters; the script sees the node as a variable with `-` made `_`, \
                and its host name is the name without `_` (as NixOS's)";
    if !is_node_name(name) || name.len() > 63 {
        let why = if name.len() > 63 {
            "longer than 63 characters"
        } else {
            "must match [a-z][a-z0-9_-]*"
        };
        return Err(cx.invalid(
            span,
            format!("invalid node name `{name}`: {why}"),
            why,
            help,
        ));
    }
    let py = python_name(name);
    if PYTHON_KEYWORDS.contains(&py.as_str()) {
        return Err(cx.invalid(
            span,
            format!("invalid node name `{name}`: `{py}` is a Python keyword"),
            "Python keyword",
            "the script refers to each node by name; pick another name",
        ));
    }
    if RESERVED_NAMES.contains(&py.as_str()) {
        return Err(cx.invalid(
            span,
            format!("invalid node name `{name}`: `{py}` is a test driver global"),
            "clashes with a driver global",
            format!(
                "the script's globals include {}; pick another name",
                RESERVED_NAMES.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A shared directory's name: it becomes the 9p mount tag `vmrig-sd-<name>`, at most 31
/// bytes.
fn is_shared_dir_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}
