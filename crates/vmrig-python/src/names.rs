//! Machine names as Python identifiers.

use serde::Serialize;

/// A node as the script sees it: its name and the Python global it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
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

/// Upstream's `pythonize_name` (one function for test-file nodes and start scripts).
pub use vmrig_spec::python_name as pythonize_name;

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
