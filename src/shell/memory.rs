//! Memory readings from /proc and the cgroup filesystem, for the engine's pool policy and
//! `/status`: what the host can still give us, and what each claude's process group holds.

use std::collections::HashMap;
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

/// Resident bytes per process group, for every process on the host (one pass over /proc).
pub fn group_rss() -> HashMap<u32, u64> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut groups = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return groups };
    for entry in dir.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command name: state ppid pgrp ... rss is the 22nd of them.
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        if let (Some(pgrp), Some(rss)) = (fields.get(2), fields.get(21)) {
            if let (Ok(pgrp), Ok(rss)) = (pgrp.parse::<u32>(), rss.parse::<u64>()) {
                *groups.entry(pgrp).or_insert(0) += rss * page;
            }
        }
    }
    groups
}
