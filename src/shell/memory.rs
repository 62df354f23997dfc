//! What memory the host can still give us (/proc/meminfo and the cgroup filesystem), for the
//! engine's pool policy and `/status`; what each claude holds is `procfs::group_rss`.

use std::path::PathBuf;

/// Read from here instead of /proc/meminfo (a test seam: loopback tests script the host's
/// available memory while the claudes' sizes stay real).
pub const ENV_MEMINFO: &str = "SYNTHESIS_MEMINFO";

/// Bytes available to synthesis and its claudes: the tighter of the host's MemAvailable and
/// the room left under our cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`).
pub fn available() -> Option<u64> {
    let meminfo = std::env::var_os(ENV_MEMINFO).map_or_else(|| PathBuf::from("/proc/meminfo"), PathBuf::from);
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let host = line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    Some(cgroup_room().map_or(host, |room| room.min(host)))
}

fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |path: String| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            // cgroup v2: "max" (no limit) does not parse and means no room limit.
            let dir = format!("/sys/fs/cgroup{path}");
            if let (Some(max), Some(current)) =
                (read(format!("{dir}/memory.max")), read(format!("{dir}/memory.current")))
            {
                return Some(max.saturating_sub(current));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            let limit = read(format!("{dir}/memory.limit_in_bytes"))?;
            let usage = read(format!("{dir}/memory.usage_in_bytes"))?;
            // v1 reports "no limit" as a huge number.
            return (limit < 1 << 60).then(|| limit.saturating_sub(usage));
        }
    }
    None
}
