//! Figures only /proc knows: resident memory (of synthesis, of each claude process group), open
//! files, CPU time and start time, for `/status` and `/metrics`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::engine::HostFigures;

/// The fields of `/proc/<pid>/stat` after the command name: `fields[0]` is the state (field 3
/// of proc(5)), so field N of proc(5) is `fields[N - 3]`.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(String::from).collect())
}

fn field(fields: &[String], n: usize) -> u64 {
    fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or(0)
}

fn sysconf(name: libc::c_int) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v as u64
    } else {
        1
    }
}

/// Resident bytes per process group, for every process on the host (one pass over /proc).
pub fn group_rss() -> HashMap<u32, u64> {
    let page = sysconf(libc::_SC_PAGESIZE);
    let mut groups = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return groups };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Some(f) = stat_fields(pid) else { continue };
        *groups.entry(field(&f, 5) as u32).or_insert(0) += field(&f, 24) * page;
        // pgrp; rss in pages
    }
    groups
}

/// Resident bytes of every live process whose process group is one of `groups`.
pub fn group_rss_bytes(groups: &[u32]) -> u64 {
    if groups.is_empty() {
        return 0;
    }
    let all = group_rss();
    groups.iter().filter_map(|g| all.get(g)).sum()
}

/// synthesis's own figures, plus the claude process groups' memory.
pub fn host_figures(claude_groups: &[u32]) -> HostFigures {
    let own = stat_fields("self").unwrap_or_default();
    let ticks = sysconf(libc::_SC_CLK_TCK) as f64;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
    let start_time_seconds = match boot {
        Some(boot) => boot as f64 + field(&own, 22) as f64 / ticks,
        None => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
    };
    HostFigures {
        claude_rss_bytes: group_rss_bytes(claude_groups),
        rss_bytes: field(&own, 24) * sysconf(libc::_SC_PAGESIZE),
        start_time_seconds,
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        cpu_seconds: (field(&own, 14) + field(&own, 15)) as f64 / ticks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_figures_are_plausible() {
        let h = host_figures(&[]);
        assert!(h.rss_bytes > 100_000, "{h:?}");
        assert!(h.open_fds >= 3, "{h:?}");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(h.start_time_seconds > now - 3600.0 && h.start_time_seconds <= now + 1.0, "{h:?}");
        // This test process leads no group of its own necessarily; its group's memory is at least its own.
        let pgid = unsafe { libc::getpgrp() } as u32;
        assert!(group_rss_bytes(&[pgid]) >= h.rss_bytes / 2);
    }
}
