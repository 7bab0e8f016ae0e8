//! Reads `/proc`: a process's resident memory (`VmRSS`), whether it is still alive, its pid in
//! each pid namespace (`NSpid`), and the machine's memory (`/proc/meminfo`) when no cgroup
//! limit applies.

use std::path::{Path, PathBuf};

/// What `/proc/PID/status` says about a process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStatus {
    /// Resident set size, in bytes (`VmRSS`; absent for kernel threads and zombies).
    pub rss_bytes: Option<u64>,
    /// `false` for a zombie (`Z`) or dead (`X`) process: its memory is already back.
    pub running: bool,
}

/// A reader of a `/proc` tree (`/proc` normally; a fixture directory in tests).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    /// A reader rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `/proc/PID/status`, or `None` when the process is gone.
    pub fn status(&self, pid: u32) -> Option<ProcStatus> {
        let text = std::fs::read_to_string(self.root.join(pid.to_string()).join("status")).ok()?;
        Some(parse_status(&text))
    }

    /// Whether `pid` names a live process (not gone, not a zombie).
    pub fn alive(&self, pid: u32) -> bool {
        self.status(pid).is_some_and(|s| s.running)
    }

    /// `NSpid` of `/proc/PID/status`: the pid in each pid namespace, outermost first.
    pub fn ns_pids(&self, pid: u32) -> Vec<u32> {
        std::fs::read_to_string(self.root.join(pid.to_string()).join("status"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("NSpid:"))
                    .map(|rest| {
                        rest.split_whitespace()
                            .filter_map(|p| p.parse().ok())
                            .collect()
                    })
            })
            .unwrap_or_default()
    }

    /// `MemTotal` and `MemTotal - MemAvailable` from `/proc/meminfo`, in bytes.
    pub fn meminfo(&self) -> Option<MemInfo> {
        let text = std::fs::read_to_string(self.root.join("meminfo")).ok()?;
        parse_meminfo(&text)
    }
}

/// The machine's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`, bytes.
    pub total_bytes: u64,
    /// `MemTotal - MemAvailable`, bytes.
    pub used_bytes: u64,
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value.saturating_mul(1024)),
            Some(_) => None,
        }
    })
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> ProcStatus {
    let state = text
        .lines()
        .find_map(|line| line.strip_prefix("State:"))
        .and_then(|rest| rest.trim_start().chars().next());
    ProcStatus {
        rss_bytes: kib_field(text, "VmRSS"),
        running: !matches!(state, Some('Z' | 'X' | 'x')),
    }
}

/// Parses the text of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let total = kib_field(text, "MemTotal")?;
    let available = kib_field(text, "MemAvailable")
        .or_else(|| kib_field(text, "MemFree"))
        .unwrap_or(0);
    Some(MemInfo {
        total_bytes: total,
        used_bytes: total.saturating_sub(available),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let text = "Name:\tpython\nState:\tS (sleeping)\nNSpid:\t4242\t7\nVmRSS:\t  102400 kB\n";
        let status = parse_status(text);
        assert_eq!(status.rss_bytes, Some(100 << 20));
        assert!(status.running);
        let zombie = parse_status("State:\tZ (zombie)\n");
        assert!(!zombie.running);
        assert_eq!(zombie.rss_bytes, None);
    }

    #[test]
    fn meminfo_fields() {
        let info =
            parse_meminfo("MemTotal: 2048 kB\nMemFree: 100 kB\nMemAvailable: 1024 kB\n").unwrap();
        assert_eq!(info.total_bytes, 2 << 20);
        assert_eq!(info.used_bytes, 1 << 20);
    }

    #[test]
    fn own_process_is_alive_with_rss() {
        let proc = ProcFs::default();
        let me = std::process::id();
        assert!(proc.alive(me));
        assert!(proc.status(me).unwrap().rss_bytes.unwrap() > 0);
        assert!(proc.ns_pids(me).contains(&me));
    }
}
