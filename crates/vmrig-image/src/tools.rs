//! Host tools the image builders need, checked up front with one message listing what to
//! install.

use std::path::PathBuf;

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct HostTool {
    pub program: &'static str,
    pub package: &'static str,
}

/// What `vmrig build` runs on the host.
pub const BUILD_TOOLS: &[HostTool] = &[
    HostTool {
        program: "mmdebstrap",
        package: "mmdebstrap",
    },
    HostTool {
        program: "mke2fs",
        package: "e2fsprogs",
    },
    HostTool {
        program: "depmod",
        package: "kmod",
    },
];

/// Finds `program` on `PATH` (and in the sbin directories, which non-root PATHs lack).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The tools of `tools` that are missing, as `(program, package)`.
pub fn missing(tools: &[HostTool]) -> Vec<HostTool> {
    tools
        .iter()
        .copied()
        .filter(|t| find_program(t.program).is_none())
        .collect()
}

/// One line that names every missing program and the command that installs them all.
pub fn missing_message(missing: &[HostTool]) -> String {
    let programs: Vec<_> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<_> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    format!(
        "missing host tools: {} (install them with: sudo apt-get install {})",
        programs.join(", "),
        packages.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_programs_and_packages() {
        let msg = missing_message(&[
            HostTool {
                program: "mmdebstrap",
                package: "mmdebstrap",
            },
            HostTool {
                program: "mke2fs",
                package: "e2fsprogs",
            },
        ]);
        assert_eq!(
            msg,
            "missing host tools: mmdebstrap, mke2fs (install them with: sudo apt-get install mmdebstrap e2fsprogs)"
        );
    }

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(find_program("sh").is_some());
        assert!(find_program("vmrig-no-such-program").is_none());
    }
}
