//! Kernel command line parsing (`/proc/cmdline`).

/// How the root device is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpec {
    /// `root=/dev/vda` (a bare `vda` is taken as `/dev/vda`).
    Path(String),
    /// `root=LABEL=<ext2/3/4 volume label>`.
    Label(String),
    /// `root=UUID=<ext2/3/4 filesystem UUID>` (compared case-insensitively).
    Uuid(String),
}

impl RootSpec {
    pub fn parse(s: &str) -> Result<RootSpec, String> {
        if let Some(l) = s.strip_prefix("LABEL=") {
            Ok(RootSpec::Label(l.to_string()))
        } else if let Some(u) = s.strip_prefix("UUID=") {
            Ok(RootSpec::Uuid(u.to_ascii_lowercase()))
        } else if s.starts_with('/') {
            Ok(RootSpec::Path(s.to_string()))
        } else if !s.is_empty() && !s.contains('=') && !s.contains('/') {
            Ok(RootSpec::Path(format!("/dev/{s}")))
        } else {
            Err(format!(
                "unsupported root={s:?}: use a /dev path, LABEL= or UUID="
            ))
        }
    }
}

/// The settings vmrig-init takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `root=`, default `/dev/vda`.
    pub root: String,
    /// `rootfstype=`, default `ext4`; a comma list is tried in order.
    pub rootfstype: String,
    /// `rootflags=`: mount data for the root filesystem.
    pub rootflags: Option<String>,
    /// `ro` (the last of `ro`/`rw` wins): root read-only under a tmpfs overlay.
    pub ro: bool,
    /// `vmrig.init=`, default `/sbin/init`.
    pub init: String,
    /// `vmrig.debug`: print each step with its time.
    pub debug: bool,
    /// `vmrig.shell`: on a fatal error run `/bin/sh` from the initramfs first.
    pub shell: bool,
    /// `vmrig.modules=`: the disk with the kernel's modules (a `/dev` path, `LABEL=` or
    /// `UUID=`), mounted read-only on `/lib/modules/<version>` of the new root.
    pub modules: Option<String>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline {
            root: "/dev/vda".into(),
            rootfstype: "ext4".into(),
            rootflags: None,
            ro: false,
            init: "/sbin/init".into(),
            debug: false,
            shell: false,
            modules: None,
        }
    }
}

/// Splits like the kernel does: whitespace separates, double quotes group
/// (and are removed); everything after a lone `--` is for init, not us.
pub fn split(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut have = false;
    for c in text.chars() {
        if c == '"' {
            in_quote = !in_quote;
            have = true;
        } else if c.is_whitespace() && !in_quote {
            if have {
                out.push(std::mem::take(&mut cur));
                have = false;
            }
        } else {
            cur.push(c);
            have = true;
        }
    }
    if have {
        out.push(cur);
    }
    if let Some(i) = out.iter().position(|a| a == "--") {
        out.truncate(i);
    }
    out
}

fn flag(value: Option<&str>) -> bool {
    !matches!(
        value.map(str::to_ascii_lowercase).as_deref(),
        Some("0" | "n" | "no" | "false" | "off")
    )
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline::default();
        for arg in split(text) {
            let (key, value) = match arg.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (arg.as_str(), None),
            };
            match (key, value) {
                ("root", Some(v)) if !v.is_empty() => c.root = v.to_string(),
                ("rootfstype", Some(v)) if !v.is_empty() => c.rootfstype = v.to_string(),
                ("rootflags", Some(v)) => {
                    c.rootflags = (!v.is_empty()).then(|| v.to_string());
                }
                ("ro", None) => c.ro = true,
                ("rw", None) => c.ro = false,
                ("vmrig.init", Some(v)) if !v.is_empty() => c.init = v.to_string(),
                ("vmrig.debug", v) => c.debug = flag(v),
                ("vmrig.shell", v) => c.shell = flag(v),
                ("vmrig.modules", Some(v)) => c.modules = (!v.is_empty()).then(|| v.to_string()),
                _ => {}
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Cmdline::parse("console=ttyS0 panic=-1\n");
        assert_eq!(c, Cmdline::default());
        assert_eq!(c.root, "/dev/vda");
        assert_eq!(c.rootfstype, "ext4");
        assert!(!c.ro);
        assert_eq!(c.init, "/sbin/init");
    }

    #[test]
    fn all_keys() {
        let c = Cmdline::parse(
            "console=ttyS0 root=/dev/vdb rootfstype=ext4,ext2 rootflags=noload,errors=remount-ro ro \
             vmrig.init=/lib/systemd/systemd vmrig.debug vmrig.shell=1 quiet \
             vmrig.modules=LABEL=vmrig-modules\n",
        );
        assert_eq!(c.modules.as_deref(), Some("LABEL=vmrig-modules"));
        assert_eq!(c.root, "/dev/vdb");
        assert_eq!(c.rootfstype, "ext4,ext2");
        assert_eq!(c.rootflags.as_deref(), Some("noload,errors=remount-ro"));
        assert!(c.ro);
        assert_eq!(c.init, "/lib/systemd/systemd");
        assert!(c.debug);
        assert!(c.shell);
    }

    #[test]
    fn last_of_ro_rw_wins_and_flags_can_be_off() {
        assert!(!Cmdline::parse("ro rw").ro);
        assert!(Cmdline::parse("rw ro").ro);
        assert!(!Cmdline::parse("vmrig.debug=0").debug);
        assert!(!Cmdline::parse("vmrig.shell=off").shell);
        // Not our keys, even if they look similar.
        let c = Cmdline::parse("root= rootro vmrig.debugx rootfstype=");
        assert_eq!(c, Cmdline::default());
    }

    #[test]
    fn quotes_and_double_dash() {
        assert_eq!(
            split("a \"b c\" d=\"e f\"  g"),
            vec!["a", "b c", "d=e f", "g"]
        );
        let c = Cmdline::parse("vmrig.init=\"/bin/my init\" -- root=/dev/sdz ro");
        assert_eq!(c.init, "/bin/my init");
        assert_eq!(c.root, "/dev/vda");
        assert!(!c.ro);
        assert!(split("").is_empty());
    }

    #[test]
    fn root_spec() {
        assert_eq!(
            RootSpec::parse("/dev/vda"),
            Ok(RootSpec::Path("/dev/vda".into()))
        );
        assert_eq!(
            RootSpec::parse("vdb"),
            Ok(RootSpec::Path("/dev/vdb".into()))
        );
        assert_eq!(
            RootSpec::parse("LABEL=nixos"),
            Ok(RootSpec::Label("nixos".into()))
        );
        assert_eq!(
            RootSpec::parse("UUID=ABCD-1"),
            Ok(RootSpec::Uuid("abcd-1".into()))
        );
        assert!(RootSpec::parse("PARTUUID=1234").is_err());
        assert!(RootSpec::parse("").is_err());
    }
}
