//! A model server's processes, for the server drivers (`KServeV2`, `Ollama`, `Vllm`): finding
//! the server (a command-line match, or the process that listens on its port) and reading its
//! whole process tree. Servers load models in child processes (MLServer's workers, Ollama's
//! runners), so an unload is proven on the tree's RSS, not on one pid's.
//!
//! ```text
//!  /proc/*/stat (ppid, start time) ─┬─ --process-match: oldest process whose cmdline contains it
//!  /proc/*/cmdline                  └─ else: oldest owner of the LISTEN socket on the URL's port
//!  /proc/net/tcp{,6}, /proc/*/fd       (socket inode → pid)
//!  the server ─► itself + every descendant ─► Σ VmRSS (/proc/PID/status)
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use super::proc::ProcFs;

/// How the server is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMatch {
    /// A substring of the server's command line (arguments joined by spaces).
    pub command_line: Option<String>,
    /// The port the server listens on (the fallback when no command line is given).
    pub port: Option<u16>,
    /// Every matching process and its tree (one server per model), not only the oldest.
    pub all: bool,
}

/// One reading of the server's process tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeReading {
    /// The server's (topmost) process.
    pub root: u32,
    /// Its start time (clock ticks since boot): a restarted server has a new one even if
    /// its pid were reused.
    pub started: u64,
    /// Every process of the tree, the root first.
    pub pids: Vec<u32>,
    /// The tree's resident memory, bytes.
    pub rss_bytes: u64,
    /// The tree's VRAM (NVML per process, summed over the tree's pids that NVML lists);
    /// `None`: no GPU reading covers the server (filled in by the shell, which has the meter).
    pub vram_bytes: Option<u64>,
    /// How the root was found: `command line` or `port`.
    pub found_by: &'static str,
}

/// Finds and reads a server's process tree in a `/proc` tree.
#[derive(Debug, Clone)]
pub struct ServerProcesses {
    proc: ProcFs,
    matcher: ServerMatch,
    own_pid: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    ppid: u32,
    started: u64,
}

impl ServerProcesses {
    /// A finder on the real `/proc`.
    pub fn new(matcher: ServerMatch) -> Self {
        Self::with_proc(ProcFs::default(), matcher)
    }

    /// A finder on a given `/proc` tree (tests).
    pub fn with_proc(proc: ProcFs, matcher: ServerMatch) -> Self {
        Self {
            proc,
            matcher,
            own_pid: std::process::id(),
        }
    }

    /// How the server is found.
    pub fn matcher(&self) -> &ServerMatch {
        &self.matcher
    }

    /// Reads the server's tree now; `None` when no server process is found.
    pub fn read(&self) -> Option<TreeReading> {
        let table = self.table();
        let (candidates, found_by): (Vec<u32>, _) =
            match (&self.matcher.command_line, self.matcher.port) {
                (Some(needle), _) => (
                    table
                        .keys()
                        .copied()
                        .filter(|pid| *pid != self.own_pid)
                        .filter(|pid| {
                            self.cmdline(*pid)
                                .is_some_and(|c| c.contains(needle.as_str()))
                        })
                        .collect(),
                    "command line",
                ),
                (None, Some(port)) => (self.port_owners(port, &table), "port"),
                (None, None) => return None,
            };
        // The oldest candidate: the server itself, not a child that inherited its socket or
        // a short-lived process whose command line happens to match.
        let root = candidates
            .iter()
            .copied()
            .filter_map(|pid| table.get(&pid).map(|e| (e.started, pid)))
            .min()?
            .1;
        let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (pid, entry) in &table {
            children.entry(entry.ppid).or_default().push(*pid);
        }
        let mut pids = vec![root];
        if self.matcher.all {
            // Every matching process whose parent does not match: one tree per server.
            let set: BTreeSet<u32> = candidates.iter().copied().collect();
            pids.extend(candidates.iter().copied().filter(|pid| {
                *pid != root && table.get(pid).is_none_or(|e| !set.contains(&e.ppid))
            }));
        }
        let mut seen: BTreeSet<u32> = pids.iter().copied().collect();
        let mut next = 0;
        while next < pids.len() {
            if let Some(kids) = children.get(&pids[next]) {
                for kid in kids {
                    if seen.insert(*kid) {
                        pids.push(*kid);
                    }
                }
            }
            next += 1;
        }
        let rss_bytes = pids
            .iter()
            .filter_map(|pid| self.proc.status(*pid))
            .filter(|s| s.running)
            .filter_map(|s| s.rss_bytes)
            .sum();
        Some(TreeReading {
            root,
            started: table.get(&root).map_or(0, |e| e.started),
            pids,
            rss_bytes,
            vram_bytes: None,
            found_by,
        })
    }

    /// Every live process: its parent and start time (`/proc/PID/stat`).
    fn table(&self) -> BTreeMap<u32, Entry> {
        let Ok(dir) = std::fs::read_dir(self.proc.root()) else {
            return BTreeMap::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(self.path(pid, "stat")).ok()?;
                parse_stat(&stat).map(|entry| (pid, entry))
            })
            .collect()
    }

    fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.proc.root().join(pid.to_string()).join(file)
    }

    fn cmdline(&self, pid: u32) -> Option<String> {
        let raw = std::fs::read(self.path(pid, "cmdline")).ok()?;
        let text = String::from_utf8_lossy(&raw);
        Some(
            text.trim_end_matches('\0')
                .split('\0')
                .collect::<Vec<_>>()
                .join(" "),
        )
    }

    /// The processes holding a listening TCP socket on `port`.
    fn port_owners(&self, port: u16, table: &BTreeMap<u32, Entry>) -> Vec<u32> {
        let inodes: BTreeSet<u64> = ["net/tcp", "net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.proc.root().join(f)).ok())
            .flat_map(|text| listening_inodes(&text, port))
            .collect();
        if inodes.is_empty() {
            return Vec::new();
        }
        table
            .keys()
            .copied()
            .filter(|pid| {
                let Ok(fds) = std::fs::read_dir(self.path(*pid, "fd")) else {
                    return false;
                };
                fds.filter_map(Result::ok).any(|fd| {
                    std::fs::read_link(fd.path()).ok().is_some_and(|target| {
                        target
                            .to_str()
                            .and_then(|t| t.strip_prefix("socket:["))
                            .and_then(|t| t.strip_suffix(']'))
                            .and_then(|t| t.parse::<u64>().ok())
                            .is_some_and(|inode| inodes.contains(&inode))
                    })
                })
            })
            .collect()
    }
}

/// `(ppid, start time)` of a `/proc/PID/stat` line; `None` for a zombie or dead process.
fn parse_stat(text: &str) -> Option<Entry> {
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), [1] the ppid (4), [19] the start time (22).
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    Some(Entry {
        ppid: fields.get(1)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

/// Inodes of the sockets listening on `port` in a `/proc/net/tcp{,6}` table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *state == "0A")
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let line = "42 (my (odd) server) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 12345 1000 10 18446744073709551615";
        let entry = parse_stat(line).unwrap();
        assert_eq!(entry.ppid, 7);
        assert_eq!(entry.started, 12345);
        assert!(parse_stat(&line.replace(") S", ") Z")).is_none());
    }

    #[test]
    fn listening_sockets_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0\n   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0\n";
        assert_eq!(listening_inodes(table, 8080), vec![111]);
        assert!(listening_inodes(table, 8081).is_empty());
    }

    fn process(root: &std::path::Path, pid: u32, ppid: u32, started: u64, cmd: &str, rss_kb: u64) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("stat"),
            format!("{pid} (x) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {started} 0 0"),
        )
        .unwrap();
        let mut f = std::fs::File::create(dir.join("cmdline")).unwrap();
        for arg in cmd.split(' ') {
            f.write_all(arg.as_bytes()).unwrap();
            f.write_all(b"\0").unwrap();
        }
        std::fs::write(
            dir.join("status"),
            format!("Name:\tx\nState:\tS (sleeping)\nVmRSS:\t{rss_kb} kB\n"),
        )
        .unwrap();
    }

    #[test]
    fn the_oldest_match_and_all_its_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        process(root, 10, 1, 100, "python mlserver start .", 1000);
        process(root, 11, 10, 110, "python -c spawn_main", 5000);
        process(root, 12, 11, 120, "helper", 10);
        process(root, 20, 1, 200, "grep mlserver start", 1);
        process(root, 30, 1, 50, "unrelated", 99999);
        let finder = ServerProcesses::with_proc(
            ProcFs::new(root),
            ServerMatch {
                command_line: Some("mlserver start".into()),
                port: None,
                all: false,
            },
        );
        let tree = finder.read().unwrap();
        assert_eq!(tree.root, 10);
        assert_eq!(tree.pids, vec![10, 11, 12]);
        assert_eq!(tree.rss_bytes, (1000 + 5000 + 10) * 1024);
        assert_eq!(tree.found_by, "command line");
        let nothing = ServerProcesses::with_proc(
            ProcFs::new(root),
            ServerMatch {
                command_line: Some("ollama serve".into()),
                port: None,
                all: false,
            },
        );
        assert_eq!(nothing.read(), None);
        let every = ServerProcesses::with_proc(
            ProcFs::new(root),
            ServerMatch {
                command_line: Some("start".into()),
                port: None,
                all: true,
            },
        );
        let tree = every.read().unwrap();
        assert_eq!(tree.root, 10);
        assert_eq!(tree.pids, vec![10, 20, 11, 12]);
    }
}
