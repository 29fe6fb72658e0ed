//! Which tests a `vmrig run` runs: files and directories expanded, `--filter`, `--partition`.

use std::path::{Path, PathBuf};

/// Test files of `args`: each file as given, each directory's `*.toml` files (sorted, not
/// recursive). A directory without any is an error ([`NoTests`], exit code 2).
pub fn expand(args: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for arg in args {
        if arg.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(arg)
                .map_err(|e| with_path(e, arg))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
                .collect();
            if found.is_empty() {
                return Err(NoTests(arg.clone()).into());
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(arg.clone());
        }
    }
    Ok(files)
}

fn with_path(e: std::io::Error, path: &Path) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot read the test directory {}", path.display()))
}

/// A directory named on the command line that holds no test file.
#[derive(Debug)]
pub struct NoTests(pub PathBuf);

impl std::fmt::Display for NoTests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: no test files (*.toml) in this directory; name test files or a directory \
             that holds some",
            self.0.display()
        )
    }
}

impl std::error::Error for NoTests {}

/// `--partition k/n`: shard `k` (from 1) of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Partition, String> {
        let bad = || format!("invalid partition `{s}`: use k/n with 1 <= k <= n, such as 2/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Partition { index, count })
    }
}

impl Partition {
    /// Keeps the items of this shard. Items are ordered by `name` (ties by their place)
    /// and dealt round-robin, so every shard of the same list gets a disjoint, near-equal
    /// share, whatever order the files were given in.
    pub fn select<T>(&self, items: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| name(&items[a]).cmp(name(&items[b])).then(a.cmp(&b)));
        let mut keep = vec![false; items.len()];
        for (rank, &i) in order.iter().enumerate() {
            keep[i] = rank % self.count == self.index - 1;
        }
        items
            .into_iter()
            .zip(keep)
            .filter_map(|(item, k)| k.then_some(item))
            .collect()
    }
}

/// `--filter`: tests whose name contains `pattern` (case-sensitive).
pub fn filter<T>(items: Vec<T>, pattern: Option<&str>, name: impl Fn(&T) -> &str) -> Vec<T> {
    match pattern {
        None => items,
        Some(p) => items.into_iter().filter(|i| name(i).contains(p)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse() {
        assert_eq!(
            "2/4".parse::<Partition>(),
            Ok(Partition { index: 2, count: 4 })
        );
        for bad in ["0/4", "5/4", "1/0", "1", "a/b", "1/2/3", ""] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_test_is_in_exactly_one_shard() {
        for total in 0..12 {
            let names: Vec<String> = (0..total)
                .map(|i| format!("t{:02}", (i * 7) % 13))
                .collect();
            for count in 1..6 {
                let mut seen: Vec<String> = Vec::new();
                let mut sizes = Vec::new();
                for index in 1..=count {
                    let shard = Partition { index, count }.select(names.clone(), |s| s);
                    sizes.push(shard.len());
                    seen.extend(shard);
                }
                seen.sort();
                let mut all = names.clone();
                all.sort();
                assert_eq!(seen, all, "{total} tests in {count} shards");
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.unwrap() - min.unwrap() <= 1, "balanced: {sizes:?}");
            }
        }
    }

    #[test]
    fn shards_do_not_depend_on_the_order_given() {
        let a = vec!["c", "a", "d", "b"];
        let b = vec!["d", "c", "b", "a"];
        let p = Partition { index: 1, count: 2 };
        let mut x = p.select(a, |s| s);
        let mut y = p.select(b, |s| s);
        x.sort();
        y.sort();
        assert_eq!(x, ["a", "c"]);
        assert_eq!(x, y);
    }

    #[test]
    fn filters_by_substring() {
        let tests = vec!["client-server", "single", "server-only"];
        assert_eq!(
            filter(tests.clone(), Some("server"), |s| s),
            ["client-server", "server-only"]
        );
        assert_eq!(filter(tests.clone(), None, |s| s).len(), 3);
        assert!(filter(tests, Some("nothing"), |s| s).is_empty());
    }

    #[test]
    fn directories_expand_to_their_toml_files() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.toml", "a.toml", "notes.md"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.toml")).unwrap();
        let files = expand(&[dir.path().to_owned(), PathBuf::from("x.toml")]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.toml", "b.toml", "x.toml"]);
    }
}
