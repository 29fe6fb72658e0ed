//! Machine names as Python identifiers.

use serde::Serialize;

/// A node as the script sees it: its name and the Python global it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineInfo {
    pub name: String,
    pub python_name: String,
}

impl MachineInfo {
    /// A machine whose Python name is derived from `name` as upstream does.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let python_name = pythonize_name(&name);
        MachineInfo { name, python_name }
    }
}

/// Upstream's `pythonize_name`: a leading character that cannot start an
/// identifier, and every character that cannot be in one, becomes `_`
/// (`my-node` -> `my_node`, `1st` -> `_st`).
pub fn pythonize_name(name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pythonize_like_upstream() {
        assert_eq!(pythonize_name("my-node"), "my_node");
        assert_eq!(pythonize_name("server"), "server");
        assert_eq!(pythonize_name("1st"), "_st");
        assert_eq!(pythonize_name("a.b-c_d9"), "a_b_c_d9");
        assert_eq!(pythonize_name("nöde"), "n_de");
    }
}
