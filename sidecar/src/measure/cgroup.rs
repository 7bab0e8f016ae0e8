//! Reads the pod's memory from its cgroup: v2 `memory.current` / `memory.max` (`max` means no
//! limit), and the v1 `memory.usage_in_bytes` / `memory.limit_in_bytes` of older nodes.

use std::path::{Path, PathBuf};

/// Limits at or above this are v1's way of saying "no limit" (2^62 and up).
const V1_UNLIMITED: u64 = 1 << 62;

/// The cgroup version found and where its files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// cgroup v2: a directory with `memory.current` and `memory.max`.
    V2(PathBuf),
    /// cgroup v1: the memory controller's directory.
    V1(PathBuf),
}

/// The pod's memory as the cgroup accounts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    /// Bytes charged to the cgroup.
    pub used_bytes: u64,
    /// The limit in bytes, `None` when unlimited.
    pub limit_bytes: Option<u64>,
}

impl Cgroup {
    /// Finds this process's memory cgroup under `sys_fs_cgroup` (normally `/sys/fs/cgroup`),
    /// using `proc_self_cgroup` (the text of `/proc/self/cgroup`) for the nested path.
    pub fn detect(sys_fs_cgroup: &Path, proc_self_cgroup: &str) -> Option<Self> {
        // A container sees its own cgroup as the root of the mount.
        if sys_fs_cgroup.join("memory.current").is_file() {
            return Some(Self::V2(sys_fs_cgroup.to_owned()));
        }
        for line in proc_self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let relative = path.trim_start_matches('/');
            if controllers.is_empty() {
                let dir = sys_fs_cgroup.join(relative);
                if dir.join("memory.current").is_file() {
                    return Some(Self::V2(dir));
                }
            } else if controllers.split(',').any(|c| c == "memory") {
                for dir in [
                    sys_fs_cgroup.join("memory").join(relative),
                    sys_fs_cgroup.join("memory"),
                ] {
                    if dir.join("memory.usage_in_bytes").is_file() {
                        return Some(Self::V1(dir));
                    }
                }
            }
        }
        None
    }

    /// Finds this process's memory cgroup on the running system.
    pub fn detect_system() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect(Path::new("/sys/fs/cgroup"), &text)
    }

    /// Reads usage and limit now.
    pub fn read(&self) -> std::io::Result<CgroupMemory> {
        match self {
            Self::V2(dir) => {
                let used = read_u64(&dir.join("memory.current"))?;
                let max = std::fs::read_to_string(dir.join("memory.max"))?;
                Ok(CgroupMemory {
                    used_bytes: used,
                    limit_bytes: parse_v2_max(&max),
                })
            }
            Self::V1(dir) => {
                let used = read_u64(&dir.join("memory.usage_in_bytes"))?;
                let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
                Ok(CgroupMemory {
                    used_bytes: used,
                    limit_bytes: (limit < V1_UNLIMITED).then_some(limit),
                })
            }
        }
    }

    /// `cgroup v2 <dir>` or `cgroup v1 <dir>`, for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::V2(dir) => format!("cgroup v2 {}", dir.display()),
            Self::V1(dir) => format!("cgroup v1 {}", dir.display()),
        }
    }
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {error}", path.display()),
        )
    })
}

/// `memory.max`: a byte count, or `max` for no limit.
pub fn parse_v2_max(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        number => number.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_max_means_unlimited() {
        assert_eq!(parse_v2_max("max\n"), None);
        assert_eq!(parse_v2_max("1073741824\n"), Some(1 << 30));
    }

    #[test]
    fn detects_v2_and_v1_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kubepods/pod1")).unwrap();
        std::fs::write(root.join("kubepods/pod1/memory.current"), "2048\n").unwrap();
        std::fs::write(root.join("kubepods/pod1/memory.max"), "max\n").unwrap();
        let v2 = Cgroup::detect(root, "0::/kubepods/pod1\n").unwrap();
        assert_eq!(
            v2.read().unwrap(),
            CgroupMemory {
                used_bytes: 2048,
                limit_bytes: None
            }
        );

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("memory/docker/x")).unwrap();
        std::fs::write(root.join("memory/docker/x/memory.usage_in_bytes"), "4096\n").unwrap();
        std::fs::write(
            root.join("memory/docker/x/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        let v1 = Cgroup::detect(root, "4:memory:/docker/x\n0::/\n").unwrap();
        assert!(matches!(v1, Cgroup::V1(_)));
        assert_eq!(v1.read().unwrap().limit_bytes, None);
        std::fs::write(root.join("memory/docker/x/memory.limit_in_bytes"), "8192\n").unwrap();
        assert_eq!(v1.read().unwrap().limit_bytes, Some(8192));
    }
}
