//! How many tests run at once by default: as many as there are cores, and as many as the
//! memory allows, counting every VM's `memory` and leaving 2 GiB for the host.

/// Memory left to the host, MiB.
pub const HOST_RESERVE_MIB: u64 = 2048;

/// QEMU's own overhead per VM beyond the guest's memory, MiB.
pub const VM_OVERHEAD_MIB: u64 = 128;

/// The default `-j`: `min(cores, (available - reserve) / largest test's memory)`, at least 1.
pub fn default_jobs(cores: usize, available_mib: Option<u64>, largest_test_mib: u64) -> usize {
    let by_memory = match available_mib {
        Some(avail) if largest_test_mib > 0 => {
            (avail.saturating_sub(HOST_RESERVE_MIB) / largest_test_mib) as usize
        }
        _ => usize::MAX,
    };
    cores.min(by_memory).max(1)
}

/// The memory a test's VMs take, MiB (each node's `memory` plus QEMU's overhead).
pub fn test_memory_mib(spec: &vmrig_spec::TestSpec) -> u64 {
    spec.nodes
        .values()
        .map(|n| u64::from(n.memory) + VM_OVERHEAD_MIB)
        .sum()
}

/// `MemAvailable` from `/proc/meminfo`, MiB.
pub fn available_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_from_cores_and_memory() {
        // 8 cores, 10 GiB free, tests of 2 VMs x 1 GiB: (10240-2048)/2304 = 3.
        assert_eq!(default_jobs(8, Some(10_240), 2 * (1024 + 128)), 3);
        assert_eq!(default_jobs(2, Some(64_000), 1152), 2, "cores bound");
        assert_eq!(default_jobs(8, Some(1000), 1152), 1, "never below one");
        assert_eq!(default_jobs(4, None, 1152), 4, "unknown memory");
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   2097152 kB\n";
        assert_eq!(parse_meminfo(text), Some(2048));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn memory_of_a_test() {
        let spec = vmrig_spec::parse(
            "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.a]\nmemory = 512\n[nodes.b]\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(test_memory_mib(&spec), 512 + 1024 + 2 * VM_OVERHEAD_MIB);
    }
}
