//! The typed model of a test file, as produced by [`crate::parse`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Default `global_timeout`, in seconds.
pub const DEFAULT_GLOBAL_TIMEOUT: u64 = 3600;
/// Default `memory` of a node, in MiB.
pub const DEFAULT_MEMORY: u32 = 1024;
/// Smallest accepted `memory`, in MiB.
pub const MIN_MEMORY: u32 = 128;
/// Default `cpus` of a node.
pub const DEFAULT_CPUS: u32 = 1;
/// Default Debian suite: Debian 13, the current stable release.
pub const DEFAULT_SUITE: &str = "trixie";
/// Default `wanted_by` of a service that has a `script` or `exec_start`.
pub const DEFAULT_WANTED_BY: &str = "multi-user.target";

/// A whole test file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestSpec {
    /// The test's `name`.
    pub name: String,
    /// The test file, as it was given to [`crate::load`] / [`crate::parse`].
    pub path: PathBuf,
    /// The test script (inline `test_script` or the contents of `test_script_file`).
    pub script: ScriptSource,
    /// `global_timeout`, in seconds (default 3600).
    pub global_timeout: u64,
    /// The nodes, by name (alphabetical order, which is also the order of node numbers).
    pub nodes: BTreeMap<String, NodeSpec>,
    /// Where the file writes each key and list string (see [`TestSpec::package_place`]);
    /// not part of what the test says (left out of its serialized form).
    #[serde(skip)]
    pub places: crate::Places,
}

/// Where the test script came from, so that Python errors point at the right line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScriptSource {
    /// The script itself.
    pub text: String,
    /// The file that holds it: the test file for an inline `test_script`, otherwise the
    /// `test_script_file` (joined onto the test file's directory).
    pub filename: PathBuf,
    /// 1-based line of `filename` on which the first line of `text` is written: for an
    /// inline script, the line of the opening quotes, or the next line when a newline follows
    /// `'''` / `"""` (TOML drops that newline); for `test_script_file`, 1. Line `i` of `text`
    /// (from 0) is line `first_line + i` of the file, except in a `"""` string that uses
    /// escapes such as `\n` or a line-ending backslash (use `'''` for scripts).
    pub first_line: usize,
    /// 1-based column (in characters) of `filename` at which the first line of `text`
    /// starts: 1, unless the script starts on the line of its opening quote
    /// (`test_script = "start_all()"`). Only for messages (`vmrig check`), so not part of
    /// the result cache's key.
    #[serde(skip)]
    pub first_column: usize,
}

/// One node (virtual machine), with `[defaults]` already merged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    /// The node's name (`[a-z][a-z0-9_-]*`); its host name is [`NodeSpec::host_name`].
    pub name: String,
    /// Debian packages in the image (defaults first, duplicates removed, order kept).
    pub packages: Vec<String>,
    /// Local package files of `packages` (`./foo.deb`), installed with their dependencies
    /// from the archive (defaults first, duplicates removed).
    pub local_debs: Vec<LocalDeb>,
    /// Memory, in MiB.
    pub memory: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// VLANs the node is on (default `[1]`; may be empty).
    pub vlans: Vec<u8>,
    /// Whether the node has a display.
    pub graphics: bool,
    /// Extra kernel command line arguments.
    pub kernel_params: Vec<String>,
    /// Users to create, by user name.
    pub users: BTreeMap<String, UserSpec>,
    /// Files to place, by absolute guest path.
    pub files: BTreeMap<String, FileSpec>,
    /// systemd services, by name as written (`nginx`, `foo.service`, `bar@1`).
    pub services: BTreeMap<String, ServiceSpec>,
    /// systemd socket units, by name without `.socket` (NixOS's `systemd.sockets`).
    pub sockets: BTreeMap<String, SocketSpec>,
    /// Host directories shared into the running VM (NixOS's
    /// `virtualisation.sharedDirectories`), by name.
    pub shared_dirs: BTreeMap<String, SharedDirSpec>,
    /// Firewall settings.
    pub firewall: FirewallSpec,
    /// Shell commands run inside the image at build time.
    pub setup: Vec<String>,
    /// Debian suite (default `trixie`; `bookworm` is supported too).
    pub suite: String,
    /// Debian mirror URL, if any.
    pub mirror: Option<String>,
    /// Whether the node may boot from a saved snapshot (default true).
    pub snapshot: bool,
    /// Whether VLAN cards get vmrig's static `192.168.v.k` and `2001:db8:v::k` (default
    /// true). `false` is NixOS's `networking.interfaces = lib.mkForce {}`: the cards come up
    /// with only what router advertisements (or a DHCP server in the test) give them.
    pub static_addresses: bool,
}

/// `users.<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserSpec {
    pub uid: Option<u32>,
    pub groups: Vec<String>,
    pub shell: Option<String>,
    pub password: Option<String>,
    pub system: bool,
    pub home: Option<String>,
    /// Packages for this user's PATH; they are also part of the node's image.
    pub packages: Vec<String>,
}

/// `shared_dirs.<name>`: a host directory mounted read-write in the guest while the test
/// runs (over 9p, after boot or restore: boot snapshots stay valid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedDirSpec {
    /// Absolute host path (resolved against the test file's directory); a directory at
    /// parse time.
    pub source: PathBuf,
    /// Absolute guest path of the mount point.
    pub target: String,
}

/// `files."<path>"`: exactly one of `text` and `source` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileSpec {
    pub text: Option<String>,
    /// Absolute host path (resolved against the test file's directory); it existed at parse time.
    pub source: Option<PathBuf>,
    /// Octal mode as written, e.g. `"0644"` (validated: 3 or 4 octal digits).
    pub mode: Option<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl FileSpec {
    /// The mode as a number, if one was given.
    pub fn mode_bits(&self) -> Option<u32> {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
    }
}

/// A raw `service_config` value: `[Service]` settings may be given once or several times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServiceConfigValue {
    One(String),
    Many(Vec<String>),
}

impl ServiceConfigValue {
    /// The value(s) as a list.
    pub fn values(&self) -> Vec<&str> {
        match self {
            ServiceConfigValue::One(s) => vec![s.as_str()],
            ServiceConfigValue::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `sockets.<name>`: the unit `<name>.socket`, which starts `<name>.service` (or, with
/// `accept`, an instance of the template `<name>@.service`) on the first connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SocketSpec {
    /// Default true: the socket is enabled in its `wanted_by` targets.
    pub enable: bool,
    /// `ListenStream=` values: a port, `address:port` or a path.
    pub listen_streams: Vec<String>,
    /// `ListenDatagram=` values.
    pub listen_datagrams: Vec<String>,
    /// `Accept=`: one service instance per connection (default false).
    pub accept: bool,
    /// Default `["sockets.target"]`.
    pub wanted_by: Vec<String>,
    /// Raw `[Socket]` settings.
    pub socket_config: BTreeMap<String, ServiceConfigValue>,
}

/// `services.<name>`.
///
/// With `script` or `exec_start` it is a new unit made by vmrig; without, it names a unit that
/// a package ships, which is enabled (or disabled with `enable = false`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Default true.
    pub enable: bool,
    pub script: Option<String>,
    pub exec_start: Option<String>,
    /// Default `["multi-user.target"]` for new services, `[]` for packaged units.
    pub wanted_by: Vec<String>,
    pub after: Vec<String>,
    pub requires: Vec<String>,
    pub user: Option<String>,
    pub environment: BTreeMap<String, String>,
    /// `Type=` (TOML key `type`).
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Raw `[Service]` settings; scalars are turned into strings (`true` -> `"true"`).
    pub service_config: BTreeMap<String, ServiceConfigValue>,
}

impl ServiceSpec {
    /// Whether vmrig writes this unit (it has a `script` or `exec_start`).
    pub fn is_new(&self) -> bool {
        self.script.is_some() || self.exec_start.is_some()
    }

    /// The unit file name: the name as written if it has a unit suffix, else `<name>.service`.
    pub fn unit_name(name: &str) -> String {
        const SUFFIXES: &[&str] = &[
            ".service",
            ".socket",
            ".timer",
            ".target",
            ".path",
            ".mount",
            ".slice",
            ".scope",
            ".automount",
            ".swap",
            ".device",
        ];
        if SUFFIXES.iter().any(|s| name.ends_with(s)) {
            name.to_string()
        } else {
            format!("{name}.service")
        }
    }
}

/// `firewall`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FirewallSpec {
    pub enable: Option<bool>,
    pub allowed_tcp_ports: Vec<u16>,
    pub allowed_udp_ports: Vec<u16>,
}

impl FirewallSpec {
    /// `enable` if given, otherwise whether any port is listed.
    pub fn is_enabled(&self) -> bool {
        self.enable
            .unwrap_or(!self.allowed_tcp_ports.is_empty() || !self.allowed_udp_ports.is_empty())
    }
}

impl NodeSpec {
    /// The name of the node's object in the test script (`-` made `_`).
    pub fn python_name(&self) -> String {
        python_name(&self.name)
    }

    /// The node's host name (`/etc/hostname`, `/etc/hosts`): see [`host_name`].
    pub fn host_name(&self) -> String {
        host_name(&self.name)
    }

    /// Everything that decides the node's package image (and nothing else), so that nodes
    /// with equal inputs share one image.
    pub fn image_inputs(&self) -> ImageInputs {
        let mut packages: Vec<String> = self
            .packages
            .iter()
            .chain(self.users.values().flat_map(|u| u.packages.iter()))
            .cloned()
            .collect();
        packages.sort();
        packages.dedup();
        let mut user_only_packages: Vec<String> = self
            .users
            .values()
            .flat_map(|u| u.packages.iter())
            .filter(|p| !self.packages.contains(p))
            .cloned()
            .collect();
        user_only_packages.sort();
        user_only_packages.dedup();
        let mut local_debs = self.local_debs.clone();
        local_debs.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        local_debs.dedup_by(|a, b| a.sha256 == b.sha256);
        ImageInputs {
            suite: self.suite.clone(),
            mirror: self.mirror.clone(),
            packages,
            setup: self.setup.clone(),
            user_only_packages,
            local_debs,
        }
    }
}

/// The Python identifier for a machine name, by upstream's `pythonize_name`: a leading
/// character that cannot start an identifier, and every character that cannot be in one,
/// becomes `_` (`my-node` -> `my_node`, `1st` -> `_st`). For a node name (`[a-z][a-z0-9_-]*`)
/// that is `-` made `_`.
pub fn python_name(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
            if ok {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The host name of a node: its name without `_` (which host names cannot hold), as NixOS
/// derives `networking.hostName` from a node named `one_two`.
pub fn host_name(node_name: &str) -> String {
    node_name.replace('_', "")
}

/// The inputs of a node's package image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ImageInputs {
    pub suite: String,
    pub mirror: Option<String>,
    /// Node and user packages, sorted, without duplicates.
    pub packages: Vec<String>,
    /// Build-time commands, in order.
    pub setup: Vec<String>,
    /// Packages that only users asked for (in `packages` too): their programs are moved
    /// off the system PATH, onto those users' PATH only (NixOS per-user packages).
    /// Left out of the canonical form when empty, so other images keep their names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_only_packages: Vec<String>,
    /// Local package files, sorted by content hash, one per content. Serialized as their
    /// hashes only (not where they are), and left out when empty.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_hashes"
    )]
    pub local_debs: Vec<LocalDeb>,
}

/// A local Debian package file named in `packages` (`"./build/foo.deb"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct LocalDeb {
    /// The entry as written (relative to the test file's directory): messages and places.
    pub written: String,
    /// The absolute host path. Not serialized: a moved test keeps its keys.
    #[serde(skip)]
    pub path: PathBuf,
    /// The SHA-256 of the file (hex), read at parse time: a rebuilt package is a new image.
    pub sha256: String,
}

fn serialize_hashes<S: serde::Serializer>(debs: &[LocalDeb], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(debs.iter().map(|d| &d.sha256))
}

impl ImageInputs {
    /// Compact JSON with fixed key order (`suite`, `mirror`, `packages`, `setup`, then
    /// `user_only_packages` and `local_debs` when not empty).
    pub fn canonical_json(&self) -> String {
        // Serializing plain strings and vectors cannot fail.
        serde_json::to_string(self).expect("ImageInputs serializes")
    }

    /// First 32 hex digits of the SHA-256 of [`Self::canonical_json`].
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        let mut h = hex::encode(digest);
        h.truncate(32);
        h
    }
}
