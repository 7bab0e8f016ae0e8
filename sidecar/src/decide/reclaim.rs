//! Reclaim tracking: what the sidecar measured around one instance's load and unload, and
//! whether its memory is seen back. Pure: the readings come in as arguments.

use std::time::Duration;

use modelpool_policy::{Footprint, Sizes};

/// A model below this many bytes of a resource needs no reclaim proof for it.
pub const RECLAIM_NOISE_BYTES: u64 = 1 << 20;

/// The share of a model's bytes that must be seen returned for an unload to count as done.
pub const RECLAIM_SHARE: f64 = 0.8;

/// What the sidecar measured around one instance. Times are the core's clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Track {
    /// The instance it is about.
    pub generation: u64,
    /// When the load was granted.
    pub load_started: Option<Duration>,
    /// Process RSS / VRAM when the load was granted.
    pub before: Sizes,
    /// What the sidecar measured the load to add.
    pub sidecar: Sizes,
    /// What the app reported the load to add.
    pub app: Sizes,
    /// Process RSS / VRAM while the model was last known held (after load, at unload decision).
    pub reference: Sizes,
    /// When the unload was decided or reported.
    pub unload_started: Option<Duration>,
    /// Why.
    pub unload_reason: Option<&'static str>,
}

impl Track {
    /// A track for a new instance.
    pub fn new(generation: u64) -> Self {
        Self {
            generation,
            ..Self::default()
        }
    }

    /// Raises the reference to what the process holds now (the model still held).
    pub fn hold_reference(&mut self, now: Sizes) {
        self.reference = Sizes::new(
            now.vram.max(self.reference.vram),
            now.ram.max(self.reference.ram),
        );
    }
}

/// One reading of an app process, taken before the core's lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessNow {
    /// The process exists and is not a zombie.
    pub alive: bool,
    /// VmRSS, bytes.
    pub rss: Option<u64>,
    /// VRAM it uses (NVML per process), bytes.
    pub vram: Option<u64>,
}

impl ProcessNow {
    /// RSS and VRAM as a pair.
    pub fn sizes(self) -> Sizes {
        Sizes::new(self.vram, self.rss)
    }
}

/// How an instance's memory was seen back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeenBy {
    /// The Http driver's own answer.
    Driver,
    /// The session and its pid record are gone.
    SessionGone,
    /// The process exited.
    ProcessExit,
    /// The process's RSS fell.
    Proc,
    /// Its VRAM (NVML) fell.
    Nvml,
    /// Not proven: too small to see, or VRAM that no reading covers (no GPU reading in the
    /// pod); taken on the app's or server's word and counted as such.
    Unverified,
    /// Never freed: the same process announced it again from a new session (after its old
    /// session ended, e.g. while the process was paused), so it moved to that session.
    ReAnnounced,
}

impl SeenBy {
    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::SessionGone => "session_gone",
            Self::ProcessExit => "process_exit",
            Self::Proc => "proc",
            Self::Nvml => "nvml",
            Self::Unverified => "unverified",
            Self::ReAnnounced => "re_announced",
        }
    }
}

/// Whether memory came back: `Some(true)` when `now` is below `reference` by enough of
/// `expected`, `None` when there is nothing to compare (no reading, or too small to see).
pub fn returned(reference: Option<u64>, now: Option<u64>, expected: u64) -> Option<bool> {
    if expected < RECLAIM_NOISE_BYTES {
        return None;
    }
    let (reference, now) = (reference?, now?);
    let must_drop = (expected.min(reference) as f64 * RECLAIM_SHARE) as u64;
    Some(reference.saturating_sub(now) >= must_drop)
}

/// Whether an unloaded instance's memory is seen back. `pid`: its process (live session or
/// ended one), `None` when no pid is known any more; `process`: the reading taken before the
/// lock (`None`: not read, decide later); `app_server`: the Http driver's app holds it (only
/// the driver's answer proves that unload).
pub fn seen_back(
    app_server: bool,
    pid: Option<u32>,
    process: Option<ProcessNow>,
    reference: Sizes,
    expected: Footprint,
) -> Option<SeenBy> {
    match pid {
        None if app_server => None,
        None => Some(SeenBy::SessionGone),
        Some(_) => {
            let process = process?;
            if !process.alive {
                return Some(SeenBy::ProcessExit);
            }
            let ram_ok = returned(reference.ram, process.rss, expected.ram);
            let vram_ok = returned(reference.vram, process.vram, expected.vram);
            // VRAM the model held that no reading covers (no NVML in the pod: docs/gpu.md)
            // is not proven back by its RAM: such an unload is `unverified`, never `proc`.
            let vram_unread = expected.vram >= RECLAIM_NOISE_BYTES && vram_ok.is_none();
            match (ram_ok, vram_ok) {
                (Some(false), _) | (_, Some(false)) => None,
                _ if vram_unread => Some(SeenBy::Unverified),
                (Some(true), _) => Some(SeenBy::Proc),
                (None, Some(true)) => Some(SeenBy::Nvml),
                (None, None) => Some(SeenBy::Unverified),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn alive(rss: u64) -> Option<ProcessNow> {
        Some(ProcessNow {
            alive: true,
            rss: Some(rss),
            vram: None,
        })
    }

    #[test]
    fn returned_needs_most_of_the_model_back() {
        assert_eq!(
            returned(Some(300 * MIB), Some(100 * MIB), 200 * MIB),
            Some(true)
        );
        assert_eq!(
            returned(Some(300 * MIB), Some(200 * MIB), 200 * MIB),
            Some(false)
        );
        assert_eq!(returned(Some(300 * MIB), None, 200 * MIB), None);
        assert_eq!(
            returned(Some(300 * MIB), Some(0), MIB / 2),
            None,
            "too small"
        );
    }

    #[test]
    fn seen_back_by_rss_exit_or_nothing() {
        let reference = Sizes::new(None, Some(300 * MIB));
        let expected = Footprint::new(0, 200 * MIB);
        assert_eq!(
            seen_back(false, Some(1), alive(90 * MIB), reference, expected),
            Some(SeenBy::Proc)
        );
        assert_eq!(
            seen_back(false, Some(1), alive(290 * MIB), reference, expected),
            None
        );
        let gone = Some(ProcessNow::default());
        assert_eq!(
            seen_back(false, Some(1), gone, reference, expected),
            Some(SeenBy::ProcessExit)
        );
        assert_eq!(
            seen_back(false, Some(1), None, reference, expected),
            None,
            "not read: decide later"
        );
        assert_eq!(
            seen_back(false, None, None, reference, expected),
            Some(SeenBy::SessionGone)
        );
        assert_eq!(seen_back(true, None, None, reference, expected), None);
        assert_eq!(
            seen_back(
                false,
                Some(1),
                alive(0),
                Sizes::default(),
                Footprint::new(0, 10)
            ),
            Some(SeenBy::Unverified)
        );
    }

    /// Path (c) of docs/gpu.md: a model that held VRAM, unloaded where nothing reads VRAM
    /// (no NVML in the pod), is `unverified` even when its RAM came back; RAM that did not
    /// come back still waits.
    #[test]
    fn vram_no_reading_covers_leaves_the_unload_unverified() {
        let reference = Sizes::new(None, Some(300 * MIB));
        let expected = Footprint::new(2 << 30, 200 * MIB);
        assert_eq!(
            seen_back(false, Some(1), alive(90 * MIB), reference, expected),
            Some(SeenBy::Unverified),
            "RAM back, VRAM unread"
        );
        assert_eq!(
            seen_back(false, Some(1), alive(290 * MIB), reference, expected),
            None,
            "RAM not back yet: wait"
        );
        // With a VRAM reading both ways, the same unload is proven.
        let read = Sizes::new(Some(3 << 30), Some(300 * MIB));
        let after = Some(ProcessNow {
            alive: true,
            rss: Some(90 * MIB),
            vram: Some(1 << 30),
        });
        assert_eq!(
            seen_back(false, Some(1), after, read, expected),
            Some(SeenBy::Proc)
        );
        // A CPU-only model is proven by RAM alone, and an exit proves both.
        assert_eq!(
            seen_back(
                false,
                Some(1),
                alive(90 * MIB),
                reference,
                Footprint::new(0, 200 * MIB)
            ),
            Some(SeenBy::Proc)
        );
        assert_eq!(
            seen_back(
                false,
                Some(1),
                Some(ProcessNow::default()),
                reference,
                expected
            ),
            Some(SeenBy::ProcessExit)
        );
    }

    #[test]
    fn seen_back_by_vram_when_ram_says_nothing() {
        let reference = Sizes::new(Some(4 << 30), None);
        let process = Some(ProcessNow {
            alive: true,
            rss: None,
            vram: Some(1 << 30),
        });
        assert_eq!(
            seen_back(
                false,
                Some(1),
                process,
                reference,
                Footprint::new(3 << 30, 0)
            ),
            Some(SeenBy::Nvml)
        );
    }
}
