//! Measurement: what the device, the pod and each app process really hold, every reading
//! tagged with where it came from ([`Source`]).
//!
//! ```text
//!   Meter (trait) ── SystemMeter ─┬─ nvml.rs    device total/used, VRAM per process (NVML)
//!                                 ├─ cuda.rs    cuMemGetInfo fallback (opt-in, costs a context)
//!                                 ├─ cgroup.rs  pod RAM: memory.current / memory.max (v2), v1
//!                                 └─ proc.rs    VmRSS per process, liveness, /proc/meminfo
//!   app-side readings (torch / NVML inside the app) arrive on session heartbeats: see session.rs
//! ```

pub mod cgroup;
pub mod cuda;
pub mod nvml;
pub mod proc;
pub mod tree;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::{Serialize, Serializer};

/// Where a reading came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// NVML in the sidecar.
    Nvml,
    /// The CUDA driver API in the sidecar.
    Cuda,
    /// The pod's cgroup.
    Cgroup,
    /// `/proc` (`VmRSS`, `/proc/meminfo`).
    Proc,
    /// Reported by the app on its session heartbeat (`app:torch`, `app:nvml`).
    App(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nvml => f.write_str("nvml"),
            Self::Cuda => f.write_str("cuda"),
            Self::Cgroup => f.write_str("cgroup"),
            Self::Proc => f.write_str("proc"),
            Self::App(kind) => write!(f, "app:{kind}"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One GPU's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuDevice {
    /// Device index.
    pub index: u32,
    /// Device UUID (empty when the source does not know it).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Installed memory, bytes.
    pub total_bytes: u64,
    /// Memory in use by everyone on the device, bytes.
    pub used_bytes: u64,
    /// Where the numbers came from.
    pub source: Source,
}

/// The GPUs' memory, or why there is no reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReading {
    /// Devices read (empty when down).
    pub devices: Vec<GpuDevice>,
    /// Why there is no reading ("libnvidia-ml.so.1 not found ...").
    pub down_reason: Option<String>,
}

impl GpuReading {
    /// A "no GPU" reading.
    pub fn down(reason: String) -> Self {
        Self {
            devices: Vec::new(),
            down_reason: Some(reason),
        }
    }

    /// Whether any device was read.
    pub fn up(&self) -> bool {
        !self.devices.is_empty()
    }

    /// Sum of the devices' installed memory.
    pub fn total_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.total_bytes).sum()
    }

    /// Sum of the devices' used memory.
    pub fn used_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.used_bytes).sum()
    }

    /// `(used, total)` of the device that pressure is judged on: the most used (as a share of
    /// its own memory) of `devices` (the ones the pod's processes are on), or of every device
    /// read when none of those is. Summing devices would dilute one full GPU among idle ones.
    pub fn pressure(&self, devices: &BTreeSet<u32>) -> Option<(u64, u64)> {
        let share = |d: &&GpuDevice| {
            if d.total_bytes == 0 {
                0.0
            } else {
                d.used_bytes as f64 / d.total_bytes as f64
            }
        };
        let pods: Vec<&GpuDevice> = self
            .devices
            .iter()
            .filter(|d| devices.contains(&d.index))
            .collect();
        let candidates = if pods.is_empty() {
            self.devices.iter().collect()
        } else {
            pods
        };
        candidates
            .into_iter()
            .max_by(|a, b| share(a).total_cmp(&share(b)))
            .map(|d| (d.used_bytes, d.total_bytes))
    }
}

/// The pod's host memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamReading {
    /// Bytes in use (cgroup charge, or the machine's used memory without a cgroup).
    pub used_bytes: u64,
    /// The cgroup limit, if any.
    pub limit_bytes: Option<u64>,
    /// What `used_bytes` is a share of: the limit, or the machine's memory.
    pub total_bytes: u64,
    /// Where the numbers came from.
    pub source: Source,
}

/// One app process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessReading {
    /// The process exists and is not a zombie.
    pub alive: bool,
    /// `VmRSS`, bytes (source: proc).
    pub rss_bytes: Option<u64>,
}

/// The measurement interface the sidecar uses; [`SystemMeter`] is the real one.
pub trait Meter: Send + Sync + 'static {
    /// Device memory.
    fn gpu(&self) -> GpuReading;
    /// Pod memory.
    fn ram(&self) -> RamReading;
    /// A process's liveness and resident memory.
    fn process(&self, pid: u32) -> ProcessReading;
    /// VRAM used by each of `pids` (those with a reading), bytes, with the source.
    fn process_vram(&self, pids: &[u32]) -> BTreeMap<u32, (u64, Source)>;
    /// The GPUs (device indexes) on which any of `pids` holds memory; empty when unknown.
    fn process_devices(&self, _pids: &[u32]) -> BTreeSet<u32> {
        BTreeSet::new()
    }
}

/// NVML + optional CUDA + cgroup + /proc.
#[derive(Debug)]
pub struct SystemMeter {
    nvml: nvml::NvmlProbe,
    cuda: Option<cuda::CudaProbe>,
    cgroup: Option<cgroup::Cgroup>,
    proc: proc::ProcFs,
}

impl SystemMeter {
    /// Probes the system: NVML (unless `nvml` is false), the CUDA fallback (if asked), the cgroup.
    pub fn init(nvml: bool, cuda_fallback: bool) -> Self {
        let nvml = if nvml {
            nvml::NvmlProbe::init()
        } else {
            nvml::NvmlProbe::disabled("NVML disabled by --no-nvml")
        };
        let cuda = (cuda_fallback && nvml.down_reason().is_some()).then(cuda::CudaProbe::init);
        let cgroup = cgroup::Cgroup::detect_system();
        match &cgroup {
            Some(found) => tracing::info!(cgroup = %found.describe(), "RAM from the pod's cgroup"),
            None => tracing::info!("no memory cgroup found: RAM from /proc/meminfo"),
        }
        Self {
            nvml,
            cuda,
            cgroup,
            proc: proc::ProcFs::default(),
        }
    }
}

impl Meter for SystemMeter {
    fn gpu(&self) -> GpuReading {
        let reading = self.nvml.devices();
        match (&reading.down_reason, &self.cuda) {
            (Some(nvml_reason), Some(cuda)) => {
                let fallback = cuda.devices();
                match fallback.down_reason {
                    None => fallback,
                    Some(cuda_reason) => GpuReading::down(format!("{nvml_reason}; {cuda_reason}")),
                }
            }
            _ => reading,
        }
    }

    fn ram(&self) -> RamReading {
        let machine = self.proc.meminfo();
        let machine_total = machine.map_or(0, |m| m.total_bytes);
        if let Some(found) = &self.cgroup {
            match found.read() {
                Ok(memory) => {
                    let total = match memory.limit_bytes {
                        Some(limit) if machine_total > 0 => limit.min(machine_total),
                        Some(limit) => limit,
                        None => machine_total,
                    };
                    return RamReading {
                        used_bytes: memory.used_bytes,
                        limit_bytes: memory.limit_bytes,
                        total_bytes: total,
                        source: Source::Cgroup,
                    };
                }
                Err(error) => {
                    tracing::debug!(%error, "cgroup read failed; using /proc/meminfo");
                }
            }
        }
        RamReading {
            used_bytes: machine.map_or(0, |m| m.used_bytes),
            limit_bytes: None,
            total_bytes: machine_total,
            source: Source::Proc,
        }
    }

    fn process(&self, pid: u32) -> ProcessReading {
        match self.proc.status(pid) {
            Some(status) => ProcessReading {
                alive: status.running,
                rss_bytes: status.rss_bytes,
            },
            None => ProcessReading::default(),
        }
    }

    fn process_vram(&self, pids: &[u32]) -> BTreeMap<u32, (u64, Source)> {
        let by_host_pid = self.nvml.process_vram();
        if by_host_pid.is_empty() {
            return BTreeMap::new();
        }
        pids.iter()
            .filter_map(|&pid| {
                // NVML reports host pids; inside a pid namespace, NSpid lists the others.
                std::iter::once(pid)
                    .chain(self.proc.ns_pids(pid))
                    .find_map(|candidate| by_host_pid.get(&candidate))
                    .map(|&bytes| (pid, (bytes, Source::Nvml)))
            })
            .collect()
    }

    fn process_devices(&self, pids: &[u32]) -> BTreeSet<u32> {
        let by_host_pid = self.nvml.process_vram_by_device();
        pids.iter()
            .filter_map(|&pid| {
                std::iter::once(pid)
                    .chain(self.proc.ns_pids(pid))
                    .find_map(|candidate| by_host_pid.get(&candidate))
            })
            .flat_map(|devices| devices.keys().copied())
            .collect()
    }
}

/// Bytes of each resource, where known (`None`: not measured): the policy crate's pair.
pub use modelpool_policy::Sizes;

/// `RAM 2.3/20.0 GiB (11.5%) | VRAM 12.1/24.0 GiB (50.4%)`, or `... | VRAM no GPU (<reason>)`:
/// the seed's memory line.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryLine {
    /// RAM used, bytes.
    pub ram_used: u64,
    /// RAM total (limit or machine), bytes.
    pub ram_total: u64,
    /// VRAM used and total, bytes, or why there is no GPU reading.
    pub vram: Result<(u64, u64), String>,
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

impl fmt::Display for MemoryLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RAM {:.1}/{:.1} GiB ({:.1}%) | ",
            gib(self.ram_used),
            gib(self.ram_total),
            percent(self.ram_used, self.ram_total)
        )?;
        match &self.vram {
            Ok((used, total)) => write!(
                f,
                "VRAM {:.1}/{:.1} GiB ({:.1}%)",
                gib(*used),
                gib(*total),
                percent(*used, *total)
            ),
            Err(reason) => write!(f, "VRAM no GPU ({reason})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_line_like_the_seed() {
        let line = MemoryLine {
            ram_used: (23 << 30) / 10,
            ram_total: 20 << 30,
            vram: Ok(((121 << 30) / 10, 24 << 30)),
        };
        assert_eq!(
            line.to_string(),
            "RAM 2.3/20.0 GiB (11.5%) | VRAM 12.1/24.0 GiB (50.4%)"
        );
        let no_gpu = MemoryLine {
            ram_used: 0,
            ram_total: 0,
            vram: Err("libnvidia-ml.so.1 not found".into()),
        };
        assert_eq!(
            no_gpu.to_string(),
            "RAM 0.0/0.0 GiB (0.0%) | VRAM no GPU (libnvidia-ml.so.1 not found)"
        );
    }

    fn device(index: u32, used_gib: u64, total_gib: u64) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            name: "test".into(),
            total_bytes: total_gib << 30,
            used_bytes: used_gib << 30,
            source: Source::Nvml,
        }
    }

    /// One full GPU among idle ones is pressure on that GPU, not 1/n of it.
    #[test]
    fn pressure_is_judged_per_device_not_summed() {
        let gpu = GpuReading {
            devices: vec![device(0, 10, 80), device(1, 76, 80), device(2, 0, 40)],
            down_reason: None,
        };
        // The pod's process is on GPU 1: its 95 % counts, not 86/200 = 43 %.
        assert_eq!(
            gpu.pressure(&BTreeSet::from([1])),
            Some((76 << 30, 80 << 30))
        );
        // On GPU 0 only: GPU 1's load is another pod's business.
        assert_eq!(
            gpu.pressure(&BTreeSet::from([0])),
            Some((10 << 30, 80 << 30))
        );
        // Unknown attribution: the most used device read.
        assert_eq!(gpu.pressure(&BTreeSet::new()), Some((76 << 30, 80 << 30)));
        assert_eq!(
            gpu.pressure(&BTreeSet::from([7])),
            Some((76 << 30, 80 << 30))
        );
        assert_eq!(
            GpuReading::down("no GPU".into()).pressure(&BTreeSet::new()),
            None
        );
        // A device reporting zero total never divides by zero.
        let odd = GpuReading {
            devices: vec![device(0, 0, 0), device(1, 1, 2)],
            down_reason: None,
        };
        assert_eq!(odd.pressure(&BTreeSet::new()), Some((1 << 30, 2 << 30)));
    }

    #[test]
    fn system_meter_without_gpu_reads_ram_and_self() {
        let meter = SystemMeter::init(false, false);
        let gpu = meter.gpu();
        assert!(!gpu.up());
        assert!(gpu.down_reason.unwrap().contains("disabled"));
        let ram = meter.ram();
        assert!(ram.total_bytes > 0 && ram.used_bytes > 0, "{ram:?}");
        let me = meter.process(std::process::id());
        assert!(me.alive && me.rss_bytes.unwrap() > 0);
        assert!(!meter.process(u32::MAX - 1).alive);
    }
}
