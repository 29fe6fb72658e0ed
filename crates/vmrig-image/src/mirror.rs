//! Which Debian mirror to use when neither the spec nor `VMRIG_MIRROR` names one: the
//! host's own apt sources (no mirror host name is ever written into vmrig).

use std::path::Path;

/// The first archive URI in the host's apt sources that serves `suite`'s distribution
/// (not a security or updates-only source), if any.
pub fn host_mirror(suite: &str) -> Option<String> {
    let mut texts = vec![read(Path::new("/etc/apt/sources.list"))];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                texts.push(read(&path));
            }
        }
    }
    texts.iter().find_map(|t| mirror_in(t, suite))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Finds a Debian archive URI in one sources file (one-line or deb822 format). A source
/// counts when one of its suites is `suite` or the same distribution's family
/// (`bookworm-updates` for `bookworm`), and it is not a security archive.
pub fn mirror_in(text: &str, suite: &str) -> Option<String> {
    one_line(text, suite).or_else(|| deb822(text, suite))
}

fn serves(suites: &[&str], suite: &str) -> bool {
    suites.contains(&suite) && !suites.iter().any(|s| s.ends_with("-security"))
}

fn one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let mut words = line.split_whitespace().peekable();
        if words.next()? != "deb" {
            return None;
        }
        if words.peek()?.starts_with('[') {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        let uri = words.next()?;
        let dist = words.next()?;
        serves(&[dist], suite).then(|| uri.to_owned())
    })
}

fn deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_owned())
            })
        };
        let types = field("Types")?;
        if !types.split_whitespace().any(|t| t == "deb") {
            return None;
        }
        if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no")) {
            return None;
        }
        let suites = field("Suites")?;
        let suites: Vec<&str> = suites.split_whitespace().collect();
        let uri = field("URIs")?.split_whitespace().next()?.to_owned();
        serves(&suites, suite).then_some(uri)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_archive_not_security() {
        let text = "Types: deb\n# c\nURIs: file:///srv/mirror\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: file:///srv/mirror-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(text, "bookworm").as_deref(),
            Some("file:///srv/mirror")
        );
        assert_eq!(mirror_in(text, "trixie"), None);
    }

    #[test]
    fn one_line_with_options() {
        let text = "# x\ndeb [arch=amd64 signed-by=/k.gpg] file:///srv/mirror bookworm main\n";
        assert_eq!(
            mirror_in(text, "bookworm").as_deref(),
            Some("file:///srv/mirror")
        );
        assert_eq!(
            mirror_in(
                "deb file:///srv/security bookworm-security main",
                "bookworm"
            ),
            None
        );
    }
}
