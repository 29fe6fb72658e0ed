//! The per-node configuration layer: what changes from test to test without touching the
//! package image (hostname, hosts, addresses, users, files, services, firewall).
//!
//! It is a small cpio archive appended to the initramfs at test start. The guest init
//! copies `/vmrig/layer/**` onto the root filesystem and runs `/etc/vmrig/node-setup.sh`
//! (chrooted, before systemd starts), which creates users and enables units. The VLAN
//! cards are configured later, as NixOS does, by one `vmrig-network-addresses@ethN`
//! unit per card (after udev has seen the card, before `network.target`), from
//! `/etc/vmrig/network/ethN`. Changing a test's files or users never rebuilds an image.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use vmrig_spec::{NodeSpec, ServiceSpec, SocketSpec, SourceKind, TestSpec};

use crate::cpio_writer::CpioWriter;

/// A file of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFile {
    /// Absolute path in the guest.
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// A directory of the layer with its mode (other directories the layer needs are 0755).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDir {
    /// Absolute path in the guest.
    pub path: String,
    pub mode: u32,
}

/// The configuration layer of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeLayer {
    pub files: Vec<LayerFile>,
    /// `(link, target)` symlinks.
    pub symlinks: Vec<(String, String)>,
    /// Directories with their own modes (the trees of directory `source`s).
    pub dirs: Vec<LayerDir>,
}

/// A node's address on one VLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanAddress {
    pub vlan: u8,
    /// Interface in the guest: eth1, eth2, ... in the order of the node's `vlans`.
    pub interface: String,
    pub mac: String,
    pub ipv4: String,
    pub ipv6: String,
    /// Whether the card is given `ipv4` and `ipv6` (the node's `static_addresses`).
    pub static_addresses: bool,
}

/// Node numbers: alphabetical order, from 1.
pub fn node_number(spec: &TestSpec, node: &str) -> u8 {
    spec.nodes
        .keys()
        .position(|n| n == node)
        .map(|i| i as u8 + 1)
        .unwrap_or(0)
}

/// The node's addresses on its VLANs (DESIGN.md "Networks").
pub fn vlan_addresses(spec: &TestSpec, node: &NodeSpec) -> Vec<VlanAddress> {
    let k = node_number(spec, &node.name);
    node.vlans
        .iter()
        .enumerate()
        .map(|(i, &v)| VlanAddress {
            vlan: v,
            interface: format!("eth{}", i + 1),
            // As NixOS (qemu-flags.nix): both numbers as two hex digits.
            mac: format!("52:54:00:12:{v:02x}:{k:02x}"),
            ipv4: format!("192.168.{v}.{k}"),
            ipv6: format!("2001:db8:{v}::{k}"),
            static_addresses: node.static_addresses,
        })
        .collect()
}

/// `/etc/hosts`: every node's name at its address on the first VLAN it shares with `node`
/// (else its own first VLAN); a node without static addresses has none to list.
pub fn hosts_file(spec: &TestSpec, node: &NodeSpec) -> String {
    let mut s = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
    for other in spec.nodes.values() {
        let shared = other
            .vlans
            .iter()
            .find(|v| node.vlans.contains(v))
            .or(other.vlans.first())
            .filter(|_| other.static_addresses);
        if let Some(v) = shared {
            let k = node_number(spec, &other.name);
            let _ = writeln!(s, "192.168.{v}.{k} {}", other.host_name());
            let _ = writeln!(s, "2001:db8:{v}::{k} {}", other.host_name());
        } else if other.name == node.name {
            let _ = writeln!(s, "127.0.1.1 {}", other.host_name());
        }
    }
    s
}

/// Builds the layer of `node` in `spec`.
pub fn node_layer(spec: &TestSpec, node: &NodeSpec) -> Result<NodeLayer, std::io::Error> {
    let mut layer = NodeLayer::default();
    let mut add = |path: &str, mode: u32, contents: Vec<u8>| {
        layer.files.push(LayerFile {
            path: path.to_owned(),
            mode,
            contents,
        });
    };
    add(
        "/etc/hostname",
        0o644,
        format!("{}\n", node.host_name()).into_bytes(),
    );
    add("/etc/hosts", 0o644, hosts_file(spec, node).into_bytes());
    let id =
        hex::encode(&Sha256::digest(format!("vmrig-machine-id:{}", node.name).as_bytes())[..16]);
    add("/etc/machine-id", 0o444, format!("{id}\n").into_bytes());

    add_user_paths(node, &mut add);

    for (path, contents) in network_files(&vlan_addresses(spec, node)) {
        add(&path, 0o644, contents.into_bytes());
    }
    let mut script = setup_script_header();
    script.push_str(&users_setup(node));

    for (path, file) in &node.files {
        let owner = (file.owner.is_some() || file.group.is_some()).then(|| {
            let owner = file.owner.as_deref().unwrap_or("root");
            let group = file.group.as_deref().map(|g| format!(":{g}"));
            format!("{owner}{}", group.unwrap_or_default())
        });
        if let (None, Some(source)) = (&file.text, &file.source) {
            if std::fs::metadata(source)?.is_dir() {
                let mut placed = Vec::new();
                for entry in vmrig_spec::source_tree(source)? {
                    let guest = match entry.rel.as_str() {
                        "" => path.clone(),
                        rel => format!("{path}/{rel}"),
                    };
                    // An entry of `files` inside the tree replaces the tree's entry there.
                    if !entry.rel.is_empty() && node.files.contains_key(&guest) {
                        continue;
                    }
                    match entry.kind {
                        SourceKind::Dir => layer.dirs.push(LayerDir {
                            path: guest.clone(),
                            mode: entry.mode,
                        }),
                        SourceKind::File => add(&guest, entry.mode, std::fs::read(&entry.host)?),
                        SourceKind::Symlink(target) => layer.symlinks.push((guest.clone(), target)),
                    }
                    placed.push(guest);
                }
                if let Some(owner) = &owner {
                    script.push_str(&chown_tree(owner, &placed));
                }
                continue;
            }
        }
        let contents = match (&file.text, &file.source) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(source)) => std::fs::read(source)?,
            (None, None) => Vec::new(),
        };
        add(path, file.mode_bits().unwrap_or(0o644), contents);
        if let Some(owner) = &owner {
            let _ = writeln!(script, "chown {} {}", q(owner), q(path));
        }
    }

    for (name, service) in &node.services {
        let unit = ServiceSpec::unit_name(name);
        if service.is_new() {
            if let Some(body) = &service.script {
                add(
                    &format!("/etc/vmrig/services/{name}.sh"),
                    0o755,
                    format!("#!/bin/bash\nset -e\n{body}\n").into_bytes(),
                );
            }
            add(
                &format!("/etc/systemd/system/{unit}"),
                0o644,
                unit_file(name, service).into_bytes(),
            );
            if service.enable {
                layer
                    .symlinks
                    .extend(wants_links(&unit, &service.wanted_by));
            }
        } else if service.enable {
            if let Some(conf) = drop_in(service) {
                add(
                    &format!("/etc/systemd/system/{unit}.d/vmrig.conf"),
                    0o644,
                    conf.into_bytes(),
                );
            }
            let _ = writeln!(
                script,
                "systemctl enable --quiet {} 2>&1 || echo \"vmrig: could not enable {unit}\"",
                q(&unit)
            );
            // Extra targets for a packaged unit (its own [Install] section still applies).
            for target in &service.wanted_by {
                let _ = writeln!(
                    script,
                    "mkdir -p {wants} && ln -sf {path} {wants}/ || echo \"vmrig: could not add {unit} to {target}\"",
                    wants = q(&format!("/etc/systemd/system/{target}.wants")),
                    path = q(&format!("/lib/systemd/system/{unit}")),
                );
            }
        } else {
            let _ = writeln!(
                script,
                "systemctl disable --quiet {} 2>&1 || true",
                q(&unit)
            );
        }
    }

    for (name, socket) in &node.sockets {
        let unit = format!("{name}.socket");
        add(
            &format!("/etc/systemd/system/{unit}"),
            0o644,
            socket_unit_file(name, socket).into_bytes(),
        );
        if socket.enable {
            layer.symlinks.extend(wants_links(&unit, &socket.wanted_by));
        }
    }

    for a in vlan_addresses(spec, node) {
        layer
            .symlinks
            .push(crate::guest_bits::network_unit_link(&a.interface));
    }

    if node.firewall.is_enabled() {
        add(
            "/etc/nftables.conf",
            0o755,
            firewall_rules(node).into_bytes(),
        );
        layer.symlinks.push((
            "/etc/systemd/system/sysinit.target.wants/nftables.service".into(),
            "/lib/systemd/system/nftables.service".into(),
        ));
    }

    layer.files.push(LayerFile {
        path: "/etc/vmrig/node-setup.sh".into(),
        mode: 0o755,
        contents: script.into_bytes(),
    });
    Ok(layer)
}

/// `chown -h OWNER PATH...` for every path of a copied tree, a few kilobytes of paths a line
/// (`-h`: a symlink's own owner changes, never its target's, wherever it points).
fn chown_tree(owner: &str, paths: &[String]) -> String {
    let head = format!("chown -h {}", q(owner));
    let mut s = String::new();
    let mut line = head.clone();
    for path in paths {
        let quoted = q(path);
        if line.len() > head.len() && line.len() + quoted.len() > 8192 {
            let _ = writeln!(s, "{line}");
            line = head.clone();
        }
        line.push(' ');
        line.push_str(&quoted);
    }
    if line.len() > head.len() {
        let _ = writeln!(s, "{line}");
    }
    s
}

/// Where the image builder moves the programs of packages only users asked for.
pub const USER_PACKAGES_DIR: &str = "/opt/vmrig/user-packages";

/// Per-user packages (NixOS `users.users.<name>.packages`): their programs are on that
/// user's PATH only. Login shells read `/etc/profile.d/vmrig-user-paths.sh`; non-login bash
/// (`su alice -c ...`) reads `$BASH_ENV`, which the backdoor exports (su keeps it).
fn add_user_paths(node: &NodeSpec, add: &mut impl FnMut(&str, u32, Vec<u8>)) {
    let hook = "# vmrig: per-user packages\nif [ -n \"${USER:-}\" ] && [ -r \"/etc/vmrig/user-paths/$USER\" ]; then . \"/etc/vmrig/user-paths/$USER\"; fi\n";
    add("/etc/vmrig/bash_env", 0o644, hook.as_bytes().to_vec());
    add(
        "/etc/profile.d/vmrig-user-paths.sh",
        0o644,
        hook.as_bytes().to_vec(),
    );
    add(
        "/etc/vmrig/environment",
        0o644,
        b"export BASH_ENV=/etc/vmrig/bash_env\n".to_vec(),
    );
    for (name, user) in &node.users {
        if user.packages.is_empty() {
            continue;
        }
        let dirs: Vec<String> = user
            .packages
            .iter()
            .map(|p| format!("{USER_PACKAGES_DIR}/{p}/bin"))
            .collect();
        let text = format!("case \":$PATH:\" in *\":{first}:\"*) ;; *) PATH=\"{all}:$PATH\"; export PATH ;; esac\n", first = dirs[0], all = dirs.join(":"));
        add(
            &format!("/etc/vmrig/user-paths/{name}"),
            0o644,
            text.into_bytes(),
        );
    }
}

fn setup_script_header() -> String {
    "# vmrig node setup: run by the guest init, chrooted, before systemd starts.\n".into()
}

/// `/etc/vmrig/network/<card>` for every VLAN card: the `ip -batch` commands of its
/// `vmrig-network-addresses@<card>.service` (`replace`, so a restart changes nothing).
pub fn network_files(addresses: &[VlanAddress]) -> Vec<(String, String)> {
    addresses
        .iter()
        .map(|a| {
            let i = &a.interface;
            let mut batch = format!("# vmrig: VLAN {} ({})\n", a.vlan, a.mac);
            if a.static_addresses {
                let _ = writeln!(batch, "addr replace {}/24 dev {i}", a.ipv4);
                let _ = writeln!(batch, "addr replace {}/64 dev {i} nodad", a.ipv6);
            }
            let _ = writeln!(batch, "link set dev {i} up");
            (format!("{}/{i}", crate::guest_bits::NETWORK_DIR), batch)
        })
        .collect()
}

fn users_setup(node: &NodeSpec) -> String {
    let mut s = String::new();
    let mut groups: Vec<&String> = node.users.values().flat_map(|u| &u.groups).collect();
    groups.sort();
    groups.dedup();
    for g in groups {
        let _ = writeln!(s, "getent group {g} >/dev/null || groupadd {g}", g = q(g));
    }
    for (name, user) in &node.users {
        let mut cmd = String::from("useradd");
        if user.system {
            cmd.push_str(" --system");
        } else {
            cmd.push_str(" --create-home");
        }
        if let Some(uid) = user.uid {
            let _ = write!(cmd, " --uid {uid}");
        }
        if !user.groups.is_empty() {
            let _ = write!(cmd, " --groups {}", q(&user.groups.join(",")));
        }
        let _ = write!(
            cmd,
            " --shell {}",
            q(user.shell.as_deref().unwrap_or("/bin/bash"))
        );
        if let Some(home) = &user.home {
            let _ = write!(cmd, " --home-dir {}", q(home));
        }
        let _ = writeln!(s, "id {n} >/dev/null 2>&1 || {cmd} {n}", n = q(name));
        if let Some(password) = &user.password {
            let _ = writeln!(s, "echo {} | chpasswd", q(&format!("{name}:{password}")));
        }
    }
    s
}

/// The unit file of a new service.
pub fn unit_file(name: &str, service: &ServiceSpec) -> String {
    let mut s = format!("[Unit]\nDescription=vmrig test service {name}\n");
    unit_settings(&mut s, service);
    s.push_str("\n[Service]\n");
    if let Some(t) = &service.type_ {
        let _ = writeln!(s, "Type={t}");
    }
    match (&service.script, &service.exec_start) {
        (Some(_), _) => {
            let _ = writeln!(s, "ExecStart=/etc/vmrig/services/{name}.sh");
        }
        (None, Some(exec)) => {
            let _ = writeln!(s, "ExecStart={exec}");
        }
        (None, None) => {}
    }
    service_settings(&mut s, service);
    s
}

/// The `<target>.wants/<unit>` links that enable a unit vmrig wrote in `targets`.
fn wants_links<'a>(
    unit: &'a str,
    targets: &'a [String],
) -> impl Iterator<Item = (String, String)> + 'a {
    targets.iter().map(move |target| {
        (
            format!("/etc/systemd/system/{target}.wants/{unit}"),
            format!("../{unit}"),
        )
    })
}

/// `<name>.socket` as NixOS writes `systemd.sockets.<name>`.
pub fn socket_unit_file(name: &str, socket: &SocketSpec) -> String {
    let mut s = format!("[Unit]\nDescription=vmrig test socket {name}\n\n[Socket]\n");
    for listen in &socket.listen_streams {
        let _ = writeln!(s, "ListenStream={listen}");
    }
    for listen in &socket.listen_datagrams {
        let _ = writeln!(s, "ListenDatagram={listen}");
    }
    if socket.accept {
        s.push_str("Accept=yes\n");
    }
    for (key, value) in &socket.socket_config {
        for v in value.values() {
            let _ = writeln!(s, "{key}={v}");
        }
    }
    s
}

/// A drop-in (`<unit>.d/vmrig.conf`) with what the test file sets for a unit a package
/// brings (`after`, `requires`, `type`, `user`, `environment`, `service_config`), as NixOS
/// merges such options into the unit; `None` when it sets none of them.
pub fn drop_in(service: &ServiceSpec) -> Option<String> {
    let mut unit = String::new();
    unit_settings(&mut unit, service);
    let mut svc = String::new();
    if let Some(t) = &service.type_ {
        let _ = writeln!(svc, "Type={t}");
    }
    service_settings(&mut svc, service);
    if unit.is_empty() && svc.is_empty() {
        return None;
    }
    let mut s = String::from("# vmrig: settings from the test file\n");
    if !unit.is_empty() {
        let _ = write!(s, "[Unit]\n{unit}");
    }
    if !svc.is_empty() {
        let _ = write!(s, "[Service]\n{svc}");
    }
    Some(s)
}

fn unit_settings(s: &mut String, service: &ServiceSpec) {
    for a in &service.after {
        let _ = writeln!(s, "After={a}");
    }
    for r in &service.requires {
        let _ = writeln!(s, "Requires={r}");
    }
}

fn service_settings(s: &mut String, service: &ServiceSpec) {
    if let Some(user) = &service.user {
        let _ = writeln!(s, "User={user}");
    }
    for (k, v) in &service.environment {
        let _ = writeln!(
            s,
            "Environment=\"{k}={}\"",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        );
    }
    for (k, v) in &service.service_config {
        for value in v.values() {
            let _ = writeln!(s, "{k}={value}");
        }
    }
}

/// nftables rules: on VLAN interfaces accept only established traffic, ICMP and the listed
/// ports; loopback and eth0 (host-only user networking) are not filtered.
pub fn firewall_rules(node: &NodeSpec) -> String {
    let set = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = String::from(
        "#!/usr/sbin/nft -f\nflush ruleset\ntable inet vmrig_firewall {\n  chain input {\n    type filter hook input priority filter; policy accept;\n    iifname { \"lo\", \"eth0\" } accept\n    ct state established,related accept\n    meta l4proto { 1, 58 } accept\n",
    );
    if !node.firewall.allowed_tcp_ports.is_empty() {
        let _ = writeln!(
            s,
            "    tcp dport {{ {} }} accept",
            set(&node.firewall.allowed_tcp_ports)
        );
    }
    if !node.firewall.allowed_udp_ports.is_empty() {
        let _ = writeln!(
            s,
            "    udp dport {{ {} }} accept",
            set(&node.firewall.allowed_udp_ports)
        );
    }
    s.push_str("    drop\n  }\n}\n");
    s
}

use vmrig_vm::backdoor::shell_quote as q;

/// Writes the layer as a cpio archive (entries under `vmrig/layer/`).
pub fn write_cpio(layer: &NodeLayer, out: impl Write) -> std::io::Result<()> {
    let mut cpio = CpioWriter::new(out);
    cpio.dir("vmrig", 0o755)?;
    cpio.dir("vmrig/layer", 0o755)?;
    // Directories with modes of their own first, parents before children (a path sorts
    // before the paths below it), so no file's parents are made 0755 in their place.
    let dirs: BTreeMap<String, u32> = layer
        .dirs
        .iter()
        .map(|d| (format!("vmrig/layer{}", d.path), d.mode))
        .collect();
    for (path, mode) in dirs {
        cpio.parents(&path)?;
        cpio.dir(&path, mode)?;
    }
    let mut entries: BTreeMap<String, &LayerFile> = BTreeMap::new();
    for f in &layer.files {
        entries.insert(format!("vmrig/layer{}", f.path), f);
    }
    for (path, f) in entries {
        cpio.parents(&path)?;
        cpio.file(&path, f.mode, &f.contents)?;
    }
    for (link, target) in &layer.symlinks {
        let path = format!("vmrig/layer{link}");
        cpio.parents(&path)?;
        cpio.symlink(&path, target)?;
    }
    cpio.finish()?.flush()
}

/// Writes the VM's initrd: the store's initramfs followed by the node's layer.
pub fn write_initrd(base: &Path, layer: &NodeLayer, out: &Path) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    std::io::copy(&mut std::fs::File::open(base)?, &mut file)?;
    write_cpio(layer, &mut file)?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> TestSpec {
        vmrig_spec::parse(text, Path::new("t.toml")).unwrap()
    }

    const TWO: &str = "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.server]\nfirewall.allowed_tcp_ports = [80]\n[nodes.client]\nvlans = [1, 2]\n[nodes.router]\nvlans = [2]\n";

    #[test]
    fn addresses_follow_alphabetical_node_numbers() {
        let s = spec(TWO);
        let client = vlan_addresses(&s, &s.nodes["client"]);
        assert_eq!(
            client[0],
            VlanAddress {
                vlan: 1,
                interface: "eth1".into(),
                mac: "52:54:00:12:01:01".into(),
                ipv4: "192.168.1.1".into(),
                ipv6: "2001:db8:1::1".into(),
                static_addresses: true,
            }
        );
        assert_eq!(client[1].interface, "eth2");
        assert_eq!(client[1].ipv4, "192.168.2.1");
        assert_eq!(
            vlan_addresses(&s, &s.nodes["server"])[0].ipv4,
            "192.168.1.3"
        );
    }

    /// NixOS's node-name test: a node `one_two` is the host `onetwo` (host names have no `_`).
    #[test]
    fn host_names_drop_underscores() {
        let s = spec("name = \"t\"\ntest_script = \"\"\n[nodes.one_two]\n[nodes.a-b]\n");
        let node = &s.nodes["one_two"];
        let layer = node_layer(&s, node).unwrap();
        assert_eq!(layer_file(&layer, "/etc/hostname").unwrap(), "onetwo\n");
        let hosts = hosts_file(&s, &s.nodes["a-b"]);
        assert!(
            hosts.contains(" onetwo\n") && !hosts.contains("one_two"),
            "{hosts}"
        );
    }

    #[test]
    fn hosts_use_the_first_shared_vlan() {
        let s = spec(TWO);
        let hosts = hosts_file(&s, &s.nodes["router"]);
        assert!(hosts.contains("192.168.2.1 client\n"), "{hosts}");
        assert!(hosts.contains("192.168.2.2 router\n"), "{hosts}");
        assert!(hosts.contains("192.168.1.3 server\n"), "{hosts}");
    }

    #[test]
    fn firewall_lists_ports_and_drops_the_rest() {
        let s = spec(TWO);
        let rules = firewall_rules(&s.nodes["server"]);
        assert!(rules.contains("tcp dport { 80 } accept"));
        assert!(rules.trim_end().ends_with("drop\n  }\n}"));
        let layer = node_layer(&s, &s.nodes["server"]).unwrap();
        assert!(layer
            .symlinks
            .iter()
            .any(|(l, _)| l.ends_with("nftables.service")));
        assert!(!node_layer(&s, &s.nodes["client"])
            .unwrap()
            .symlinks
            .iter()
            .any(|(l, _)| l.ends_with("nftables.service")));
    }

    #[test]
    fn users_files_and_services() {
        let s = spec("name = \"t\"\ntest_script = \"x\"\n[nodes.m.users.alice]\ngroups = [\"wheel\"]\npassword = \"pw\"\n[nodes.m.files.\"/etc/motd\"]\ntext = \"hi\"\nmode = \"0600\"\nowner = \"alice\"\n[nodes.m.services.hello]\nscript = \"echo hi\"\nuser = \"alice\"\nenvironment = { A = \"b c\" }\n[nodes.m.services.ssh]\nenable = false\n");
        let layer = node_layer(&s, &s.nodes["m"]).unwrap();
        let setup = String::from_utf8(
            layer
                .files
                .iter()
                .find(|f| f.path == "/etc/vmrig/node-setup.sh")
                .unwrap()
                .contents
                .clone(),
        )
        .unwrap();
        assert!(
            setup.contains("getent group 'wheel' >/dev/null || groupadd 'wheel'"),
            "{setup}"
        );
        assert!(setup.contains("id 'alice' >/dev/null 2>&1 || useradd --create-home --groups 'wheel' --shell '/bin/bash' 'alice'"), "{setup}");
        assert!(setup.contains("echo 'alice:pw' | chpasswd"));
        assert!(setup.contains("chown 'alice' '/etc/motd'"));
        assert!(setup.contains("systemctl disable --quiet 'ssh.service'"));
        let motd = layer.files.iter().find(|f| f.path == "/etc/motd").unwrap();
        assert_eq!(
            (motd.mode, motd.contents.as_slice()),
            (0o600, b"hi".as_slice())
        );
        let unit = String::from_utf8(
            layer
                .files
                .iter()
                .find(|f| f.path == "/etc/systemd/system/hello.service")
                .unwrap()
                .contents
                .clone(),
        )
        .unwrap();
        assert!(
            unit.contains(
                "ExecStart=/etc/vmrig/services/hello.sh\nUser=alice\nEnvironment=\"A=b c\"\n"
            ),
            "{unit}"
        );
        assert!(layer.symlinks.contains(&(
            "/etc/systemd/system/multi-user.target.wants/hello.service".into(),
            "../hello.service".into()
        )));
    }

    /// The text of the layer's file at `path`, if it has one.
    fn layer_file(layer: &NodeLayer, path: &str) -> Option<String> {
        layer
            .files
            .iter()
            .find(|f| f.path == path)
            .map(|f| String::from_utf8(f.contents.clone()).unwrap())
    }

    #[test]
    fn packaged_units_get_a_drop_in_with_the_test_files_settings() {
        let s = spec("name = \"t\"\ntest_script = \"x\"\n[nodes.m.services.nginx]\nafter = [\"network-online.target\"]\nenvironment = { A = \"1\" }\nwanted_by = [\"graphical.target\"]\n[nodes.m.services.cron]\n");
        let layer = node_layer(&s, &s.nodes["m"]).unwrap();
        let file = |path: &str| layer_file(&layer, path);
        assert_eq!(
            file("/etc/systemd/system/nginx.service.d/vmrig.conf").unwrap(),
            "# vmrig: settings from the test file\n[Unit]\nAfter=network-online.target\n[Service]\nEnvironment=\"A=1\"\n"
        );
        // Enabling alone needs no drop-in.
        assert!(file("/etc/systemd/system/cron.service.d/vmrig.conf").is_none());
        let setup = file("/etc/vmrig/node-setup.sh").unwrap();
        assert!(
            setup.contains("systemctl enable --quiet 'nginx.service'"),
            "{setup}"
        );
        assert!(
            setup.contains("ln -sf '/lib/systemd/system/nginx.service' '/etc/systemd/system/graphical.target.wants'/"),
            "{setup}"
        );
    }

    /// rsyncd.nix's `socketActivated = true`: a socket with `Accept` and its template.
    #[test]
    fn sockets_are_written_and_enabled_and_templates_are_not_enabled() {
        let s = spec(concat!(
            "name = \"t\"\ntest_script = \"\"\n",
            "[nodes.b.sockets.rsync]\nlisten_streams = [\"873\"]\naccept = true\n",
            "socket_config = { Backlog = 8 }\n",
            "[nodes.b.sockets.\"off.socket\"]\nenable = false\nlisten_datagrams = [\"/run/off\"]\n",
            "[nodes.b.services.\"rsync@\"]\nexec_start = \"/usr/bin/rsync --daemon\"\n",
            "service_config = { StandardInput = \"socket\" }\n",
        ));
        let layer = node_layer(&s, &s.nodes["b"]).unwrap();
        assert_eq!(
            layer_file(&layer, "/etc/systemd/system/rsync.socket").unwrap(),
            "[Unit]\nDescription=vmrig test socket rsync\n\n[Socket]\nListenStream=873\nAccept=yes\nBacklog=8\n"
        );
        assert!(layer_file(&layer, "/etc/systemd/system/off.socket")
            .unwrap()
            .contains("ListenDatagram=/run/off\n"));
        let service = layer_file(&layer, "/etc/systemd/system/rsync@.service").unwrap();
        assert!(
            service.contains("ExecStart=/usr/bin/rsync --daemon\nStandardInput=socket\n"),
            "{service}"
        );
        let links: Vec<&str> = layer.symlinks.iter().map(|(l, _)| l.as_str()).collect();
        assert!(
            links.contains(&"/etc/systemd/system/sockets.target.wants/rsync.socket"),
            "{links:?}"
        );
        assert!(!links.iter().any(|l| l.contains("off.socket")), "{links:?}");
        assert!(!links.iter().any(|l| l.contains("rsync@")), "{links:?}");
    }

    /// ipv6.nix's client: `networking.interfaces = lib.mkForce {}`.
    #[test]
    fn a_node_without_static_addresses_brings_its_cards_up_bare_and_is_not_in_hosts() {
        let s = spec(&TWO.replace(
            "vlans = [1, 2]\n",
            "vlans = [1, 2]\nstatic_addresses = false\n",
        ));
        let client = node_layer(&s, &s.nodes["client"]).unwrap();
        assert_eq!(
            layer_file(&client, "/etc/vmrig/network/eth2").unwrap(),
            "# vmrig: VLAN 2 (52:54:00:12:02:01)\nlink set dev eth2 up\n"
        );
        let hosts = layer_file(&client, "/etc/hosts").unwrap();
        assert!(hosts.contains("192.168.1.3 server"), "{hosts}");
        assert!(hosts.contains("127.0.1.1 client\n"), "{hosts}");
        assert!(!hosts.contains("192.168.1.1"), "{hosts}");
        let server = node_layer(&s, &s.nodes["server"]).unwrap();
        let hosts = layer_file(&server, "/etc/hosts").unwrap();
        assert!(!hosts.contains("client"), "{hosts}");
        assert!(layer_file(&server, "/etc/vmrig/network/eth1")
            .unwrap()
            .contains("addr replace 192.168.1.3/24"),);
    }

    #[test]
    fn vlan_cards_are_configured_by_units_not_by_the_setup_script() {
        let s = spec(TWO);
        let layer = node_layer(&s, &s.nodes["client"]).unwrap();
        let file = |path: &str| layer_file(&layer, path);
        assert_eq!(
            file("/etc/vmrig/network/eth2").unwrap(),
            "# vmrig: VLAN 2 (52:54:00:12:02:01)\naddr replace 192.168.2.1/24 dev eth2\naddr replace 2001:db8:2::1/64 dev eth2 nodad\nlink set dev eth2 up\n"
        );
        assert!(file("/etc/vmrig/network/eth1").is_some());
        assert!(file("/etc/vmrig/network/eth3").is_none());
        for card in ["eth1", "eth2"] {
            assert!(
                layer.symlinks.contains(&(
                    format!("/etc/systemd/system/multi-user.target.wants/vmrig-network-addresses@{card}.service"),
                    "/etc/systemd/system/vmrig-network-addresses@.service".into()
                )),
                "{:?}",
                layer.symlinks
            );
        }
        let setup = file("/etc/vmrig/node-setup.sh").unwrap();
        assert!(!setup.contains("ip "), "{setup}");
    }

    #[test]
    fn setup_script_is_valid_sh() {
        let s = spec(TWO);
        let layer = node_layer(&s, &s.nodes["client"]).unwrap();
        let setup = layer
            .files
            .iter()
            .find(|f| f.path == "/etc/vmrig/node-setup.sh")
            .unwrap();
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(String::from_utf8_lossy(&setup.contents).as_ref())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The entries of a newc archive: (name, mode with its type bits, data).
    fn cpio_entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        let field = |at: usize, i: usize| {
            let s = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap() as usize
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        while bytes[at..].starts_with(b"070701") {
            let (mode, size, name_len) = (field(at, 1), field(at, 6), field(at, 11));
            let name_at = at + 110;
            let name = String::from_utf8(bytes[name_at..name_at + name_len - 1].to_vec()).unwrap();
            let data_at = align(name_at + name_len);
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode as u32, bytes[data_at..data_at + size].to_vec()));
            at = align(data_at + size);
        }
        out
    }

    /// A directory `source`: a test file next to `app/` with a file, an executable, a
    /// subdirectory with an unusual mode, a symlink inside the tree and one out of it.
    fn app_tree(dir: &Path) -> TestSpec {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let app = dir.join("app");
        let mode = |p: &str, m: u32| {
            std::fs::set_permissions(app.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        std::fs::create_dir_all(app.join("lib/empty")).unwrap();
        std::fs::write(app.join("README"), "read me\n").unwrap();
        std::fs::write(app.join("lib/run"), "#!/bin/sh\necho run\n").unwrap();
        symlink("lib/run", app.join("start")).unwrap();
        symlink("/etc/hostname", app.join("host")).unwrap();
        mode("README", 0o640);
        mode("lib/run", 0o755);
        mode("lib", 0o750);
        mode("lib/empty", 0o1777);
        mode(".", 0o755);
        let test = dir.join("t.toml");
        std::fs::write(
            &test,
            "name = \"t\"\ntest_script = \"\"\n[nodes.m.users.app]\n[nodes.m.files.\"/opt/app\"]\nsource = \"app/\"\nowner = \"app\"\ngroup = \"adm\"\n",
        )
        .unwrap();
        vmrig_spec::load(&test).unwrap()
    }

    #[test]
    fn a_directory_source_is_copied_as_a_tree_with_modes_links_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = app_tree(dir.path());
        let layer = node_layer(&s, &s.nodes["m"]).unwrap();
        let dirs: Vec<(&str, u32)> = layer
            .dirs
            .iter()
            .map(|d| (d.path.as_str(), d.mode))
            .collect();
        assert_eq!(
            dirs,
            [
                ("/opt/app", 0o755),
                ("/opt/app/lib", 0o750),
                ("/opt/app/lib/empty", 0o1777)
            ]
        );
        let file = |path: &str| layer.files.iter().find(|f| f.path == path).unwrap();
        assert_eq!(
            (
                file("/opt/app/README").mode,
                file("/opt/app/README").contents.as_slice()
            ),
            (0o640, b"read me\n".as_slice())
        );
        assert_eq!(file("/opt/app/lib/run").mode, 0o755);
        assert!(layer
            .symlinks
            .contains(&("/opt/app/start".into(), "lib/run".into())));
        assert!(layer
            .symlinks
            .contains(&("/opt/app/host".into(), "/etc/hostname".into())));
        // Owner and group on every entry of the tree, links themselves (-h), after useradd.
        let setup = layer_file(&layer, "/etc/vmrig/node-setup.sh").unwrap();
        let chown = "chown -h 'app:adm' '/opt/app' '/opt/app/README' '/opt/app/host' '/opt/app/lib' '/opt/app/lib/empty' '/opt/app/lib/run' '/opt/app/start'\n";
        assert!(setup.contains(chown), "{setup}");
        assert!(setup.find("useradd").unwrap() < setup.find(chown).unwrap());

        // The archive: the directories with their modes (not the 0755 of a parent made on
        // the way), the files and the links, each once.
        let mut bytes = Vec::new();
        write_cpio(&layer, &mut bytes).unwrap();
        let entries = cpio_entries(&bytes);
        let entry = |name: &str| {
            let found: Vec<_> = entries.iter().filter(|e| e.0 == name).collect();
            assert_eq!(found.len(), 1, "{name}: {found:?}");
            (found[0].1, found[0].2.clone())
        };
        assert_eq!(entry("vmrig/layer/opt").0, 0o040755);
        assert_eq!(entry("vmrig/layer/opt/app/lib").0, 0o040750);
        assert_eq!(entry("vmrig/layer/opt/app/lib/empty").0, 0o041777);
        assert_eq!(
            entry("vmrig/layer/opt/app/lib/run"),
            (0o100755, b"#!/bin/sh\necho run\n".to_vec())
        );
        assert_eq!(
            entry("vmrig/layer/opt/app/host"),
            (0o120777, b"/etc/hostname".to_vec())
        );
        // Every entry comes after its directory.
        for (i, (name, _, _)) in entries.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(
                    entries[..i].iter().any(|e| e.0 == parent),
                    "{name} before {parent}"
                );
            }
        }
    }

    /// The layer is part of the initrd, whose hash is in the boot snapshot's key: the same
    /// tree gives the same bytes, a changed byte, mode or link target other bytes.
    #[test]
    fn the_layer_follows_every_byte_mode_and_link_of_a_directory_source() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let s = app_tree(dir.path());
        let app = dir.path().join("app");
        let hash = || {
            let mut bytes = Vec::new();
            write_cpio(&node_layer(&s, &s.nodes["m"]).unwrap(), &mut bytes).unwrap();
            hex::encode(Sha256::digest(&bytes))
        };
        let first = hash();
        assert_eq!(first, hash(), "reproducible");
        std::fs::write(app.join("README"), "read me\n").unwrap();
        assert_eq!(first, hash(), "rewritten with the same bytes");

        let mut seen = vec![first];
        let mut changed = |what: &str| {
            let h = hash();
            assert!(!seen.contains(&h), "{what} did not change the layer");
            seen.push(h);
        };
        std::fs::write(app.join("README"), "read mE\n").unwrap();
        changed("one byte");
        std::fs::set_permissions(app.join("README"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        changed("a file's mode");
        std::fs::set_permissions(
            app.join("lib/empty"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        changed("a directory's mode");
        std::fs::remove_file(app.join("start")).unwrap();
        symlink("README", app.join("start")).unwrap();
        changed("a link target");
    }

    /// An entry of `files` inside a copied tree replaces the tree's entry at that path.
    #[test]
    fn a_file_entry_inside_a_copied_tree_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/a.conf"), "from the tree").unwrap();
        std::fs::write(dir.path().join("etc/b.conf"), "b").unwrap();
        let test = dir.path().join("t.toml");
        std::fs::write(
            &test,
            "name = \"t\"\ntest_script = \"\"\n[nodes.m.files.\"/etc/app\"]\nsource = \"etc\"\n[nodes.m.files.\"/etc/app/a.conf\"]\ntext = \"from the entry\"\n",
        )
        .unwrap();
        let s = vmrig_spec::load(&test).unwrap();
        let layer = node_layer(&s, &s.nodes["m"]).unwrap();
        let a: Vec<_> = layer
            .files
            .iter()
            .filter(|f| f.path == "/etc/app/a.conf")
            .collect();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].contents, b"from the entry");
        assert_eq!(layer_file(&layer, "/etc/app/b.conf").unwrap(), "b");
    }

    #[test]
    fn chown_lines_of_a_big_tree_stay_short() {
        let paths: Vec<String> = (0..2000).map(|i| format!("/opt/app/file-{i:05}")).collect();
        let s = chown_tree("app", &paths);
        assert!(s.lines().count() > 1);
        assert!(s
            .lines()
            .all(|l| l.len() <= 8192 + 40 && l.starts_with("chown -h 'app' '/")));
        let listed: Vec<&str> = s
            .lines()
            .flat_map(|l| l.split(' ').skip(3))
            .map(|p| p.trim_matches('\''))
            .collect();
        assert_eq!(listed, paths);
    }

    #[test]
    fn initrd_is_base_plus_layer() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![7u8; 1024]).unwrap();
        let s = spec(TWO);
        let layer = node_layer(&s, &s.nodes["client"]).unwrap();
        let out = dir.path().join("initrd");
        write_initrd(&base, &layer, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..1024], &[7u8; 1024][..]);
        assert!(bytes[1024..].starts_with(b"070701"));
        assert!(bytes.windows(20).any(|w| w == b"vmrig/layer/etc/host"));
    }
}
