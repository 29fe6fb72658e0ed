//! [`Places`]: where the test file writes each key and each string of a list, computed once
//! at parse time, so that an error found later (an unknown package at image build time, a
//! problem with a node's key) names `file:line:column` without reading the file again.

use std::collections::BTreeMap;
use std::fmt;

use toml_edit::{Item, TableLike, Value};

use crate::error::line_col;
use crate::model::TestSpec;

/// A place in the test file: 1-based line and column (in characters), as [`crate::SpecError`]
/// shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// The places of a test file's keys and of the strings in its lists. A key's path is the
/// keys from the top: `["nodes", "server", "memory"]`, `["defaults", "packages"]`,
/// `["nodes", "a", "files", "/etc/motd", "mode"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Places {
    keys: BTreeMap<Vec<String>, Place>,
    /// The first time each string is written in the list at a path.
    strings: BTreeMap<(Vec<String>, String), Place>,
}

impl Places {
    /// The places of every key and list string under `root` of the file `src`.
    pub(crate) fn of(src: &str, root: &dyn TableLike) -> Places {
        let mut places = Places::default();
        places.record(src, root, &mut Vec::new());
        places
    }

    fn record(&mut self, src: &str, table: &dyn TableLike, path: &mut Vec<String>) {
        let place = |span: Option<std::ops::Range<usize>>| {
            span.map(|s| {
                let (line, column) = line_col(src, s.start);
                Place { line, column }
            })
        };
        for (name, _) in table.iter() {
            let Some((key, item)) = table.get_key_value(name) else {
                continue;
            };
            path.push(name.to_owned());
            if let Some(at) = place(key.span().or_else(|| item.span())) {
                self.keys.insert(path.clone(), at);
            }
            match item {
                Item::Table(t) => self.record(src, t, path),
                Item::Value(Value::InlineTable(t)) => self.record(src, t, path),
                Item::Value(Value::Array(list)) => {
                    for value in list.iter() {
                        if let (Some(s), Some(at)) = (value.as_str(), place(value.span())) {
                            self.strings
                                .entry((path.clone(), s.to_owned()))
                                .or_insert(at);
                        }
                    }
                }
                _ => {}
            }
            path.pop();
        }
    }

    /// Where the key at `path` is written (a table's header or dotted key where it is first
    /// named).
    pub fn key(&self, path: &[&str]) -> Option<Place> {
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        self.keys.get(&path).copied()
    }

    /// Where `value` is first written in the list at `path`.
    pub fn string_in(&self, path: &[&str], value: &str) -> Option<Place> {
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        self.strings.get(&(path, value.to_owned())).copied()
    }
}

impl TestSpec {
    /// Where the test file asks for `package` for `node`: in the node's `packages` or one of
    /// its users' `packages`, else in `[defaults]` (which every node takes).
    pub fn package_place(&self, node: &str, package: &str) -> Option<Place> {
        let users: Vec<&str> = self
            .nodes
            .get(node)
            .map(|n| n.users.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut lists: Vec<Vec<&str>> = Vec::new();
        for base in [vec!["nodes", node], vec!["defaults"]] {
            lists.push([base.as_slice(), &["packages"]].concat());
            for user in &users {
                lists.push([base.as_slice(), &["users", user, "packages"]].concat());
            }
        }
        lists
            .iter()
            .find_map(|list| self.places.string_in(list, package))
    }

    /// `file:line:column` of `place`, as a [`crate::SpecError`] starts.
    pub fn location(&self, place: Place) -> String {
        format!("{}:{place}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(text: &str) -> TestSpec {
        crate::parse(text, Path::new("t.toml")).unwrap()
    }

    const HEAD: &str = "name = \"t\"\ntest_script = \"start_all()\"\n";

    #[test]
    fn a_package_is_found_where_the_node_asks_for_it() {
        let spec = spec(&format!(
            "{HEAD}\n[nodes.server]\npackages = [\"curl\", 'nosuchpkg']\n"
        ));
        let place = spec.package_place("server", "nosuchpkg").unwrap();
        assert_eq!(
            place,
            Place {
                line: 5,
                column: 21
            }
        );
        assert_eq!(spec.location(place), "t.toml:5:21");
        assert_eq!(
            spec.package_place("server", "curl"),
            Some(Place {
                line: 5,
                column: 13
            })
        );
        assert_eq!(spec.package_place("server", "vim"), None);
        assert_eq!(spec.package_place("nonode", "curl"), None);
    }

    #[test]
    fn the_nodes_own_list_then_its_users_then_the_defaults() {
        let spec = spec(&format!(
            "{HEAD}[defaults]\npackages = [\"vim\", \"curl\"]\n\
             [nodes.a]\npackages = [\n  \"curl\",\n]\n\
             [nodes.a.users.alice]\npackages = [\"git\"]\n\
             [nodes.b]\n"
        ));
        // a's own mention, not the default's.
        assert_eq!(
            spec.package_place("a", "curl"),
            Some(Place { line: 7, column: 3 })
        );
        // a user's packages.
        assert_eq!(
            spec.package_place("a", "git"),
            Some(Place {
                line: 10,
                column: 13
            })
        );
        // From [defaults], for every node.
        for node in ["a", "b"] {
            assert_eq!(
                spec.package_place(node, "vim"),
                Some(Place {
                    line: 4,
                    column: 13
                })
            );
        }
        assert_eq!(
            spec.package_place("b", "curl"),
            Some(Place {
                line: 4,
                column: 20
            })
        );
    }

    #[test]
    fn keys_of_headers_dotted_keys_and_inline_tables() {
        let spec = spec(&format!(
            "{HEAD}nodes.c = {{ kernel_params = [\"é\"], packages = [\"htop\"] }}\n\
             [nodes.server]\nmemory = 2048\nfirewall.allowed_tcp_ports = [80]\n\
             users.bob = {{ uid = 1001, packages = [\"jq\"] }}\n\
             [nodes.server.files.\"/etc/motd\"]\ntext = \"hi\"\n"
        ));
        let key = |path: &[&str]| spec.places.key(path).map(|p| (p.line, p.column));
        assert_eq!(key(&["nodes", "server", "memory"]), Some((5, 1)));
        assert_eq!(key(&["nodes", "server", "firewall"]), Some((6, 1)));
        assert_eq!(
            key(&["nodes", "server", "firewall", "allowed_tcp_ports"]),
            Some((6, 10))
        );
        assert_eq!(
            key(&["nodes", "server", "users", "bob", "uid"]),
            Some((7, 15))
        );
        assert_eq!(
            key(&["nodes", "server", "files", "/etc/motd", "text"]),
            Some((9, 1))
        );
        assert_eq!(key(&["nodes", "c", "packages"]), Some((3, 36)));
        assert_eq!(key(&["nodes", "server", "cpus"]), None);
        // Columns count characters, not bytes.
        assert_eq!(
            spec.package_place("c", "htop"),
            Some(Place {
                line: 3,
                column: 48
            })
        );
        assert_eq!(
            spec.package_place("server", "jq"),
            Some(Place {
                line: 7,
                column: 39
            })
        );
    }

    #[test]
    fn places_are_not_part_of_what_the_test_says() {
        let a = spec(&format!("{HEAD}[nodes.a]\npackages = [\"curl\"]\n"));
        let b = spec(&format!("{HEAD}\n\n[nodes.a]\npackages = [\n\"curl\"]\n"));
        assert_ne!(a.places, b.places);
        let json = |s: &TestSpec| serde_json::to_value(s).unwrap();
        assert_eq!(json(&a), json(&b));
        assert!(json(&a).get("places").is_none());
    }
}
