//! Bytes held on the GPU and in host memory, as one value.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The two resources a model holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// GPU memory.
    Vram,
    /// Host memory.
    Ram,
}

impl Resource {
    /// Both, in a fixed order.
    pub const ALL: [Resource; 2] = [Resource::Vram, Resource::Ram];

    /// The lowercase name used in metrics labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Vram => "vram",
            Resource::Ram => "ram",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value per resource: `(vram, ram)`. The one pair type of the project: bytes held
/// ([`Footprint`]), ceilings ([`Limits`]: `None` where there is none), sizes known or not
/// (`Pair<Option<u64>>`). On the wire it is `{"vram": .., "ram": ..}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pair<T> {
    /// GPU memory.
    pub vram: T,
    /// Host memory.
    pub ram: T,
}

/// Bytes of VRAM and RAM.
pub type Footprint = Pair<u64>;

/// Per-pod ceilings; `None` is no ceiling beyond the device.
pub type Limits = Pair<Option<u64>>;

/// Bytes of each resource where known (`None`: not measured).
pub type Sizes = Pair<Option<u64>>;

impl<T: Copy> Pair<T> {
    /// A pair of `vram` and `ram`.
    pub const fn new(vram: T, ram: T) -> Self {
        Self { vram, ram }
    }

    /// The value of one resource.
    pub fn get(self, resource: Resource) -> T {
        match resource {
            Resource::Vram => self.vram,
            Resource::Ram => self.ram,
        }
    }

    /// Both values through `f`.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> Pair<U> {
        Pair {
            vram: f(self.vram),
            ram: f(self.ram),
        }
    }
}

impl Pair<u64> {
    /// Componentwise saturating sum.
    pub fn plus(self, other: Self) -> Self {
        Self::new(
            self.vram.saturating_add(other.vram),
            self.ram.saturating_add(other.ram),
        )
    }

    /// Componentwise saturating difference.
    pub fn minus(self, other: Self) -> Self {
        Self::new(
            self.vram.saturating_sub(other.vram),
            self.ram.saturating_sub(other.ram),
        )
    }

    /// Componentwise maximum.
    pub fn max(self, other: Self) -> Self {
        Self::new(self.vram.max(other.vram), self.ram.max(other.ram))
    }

    /// True when both parts are zero.
    pub fn is_zero(self) -> bool {
        self.vram == 0 && self.ram == 0
    }
}

impl Pair<Option<u64>> {
    /// Whether anything is known.
    pub fn is_known(&self) -> bool {
        self.vram.is_some() || self.ram.is_some()
    }

    /// Per resource, the larger of the known values of `a` and `b` (never under-count);
    /// `fallback` where neither knows. `None` when nothing at all is known.
    pub fn combine(a: Self, b: Self, fallback: Footprint) -> Option<Footprint> {
        if !a.is_known() && !b.is_known() {
            return None;
        }
        let pick = |x: Option<u64>, y: Option<u64>, f: u64| match (x, y) {
            (Some(x), Some(y)) => x.max(y),
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => f,
        };
        Some(Footprint::new(
            pick(a.vram, b.vram, fallback.vram),
            pick(a.ram, b.ram, fallback.ram),
        ))
    }
}

impl fmt::Display for Pair<u64> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vram {}, ram {}",
            human_bytes(self.vram),
            human_bytes(self.ram)
        )
    }
}

/// Bytes in binary units for people: `12.0 GiB`, `700.0 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_combine_per_resource() {
        let sidecar = Sizes::new(None, Some(10));
        let app = Sizes::new(Some(7), Some(12));
        let fallback = Footprint::new(100, 100);
        assert_eq!(
            Sizes::combine(sidecar, app, fallback),
            Some(Footprint::new(7, 12))
        );
        assert_eq!(
            Sizes::combine(sidecar, Sizes::default(), Footprint::new(100, 200)),
            Some(Footprint::new(100, 10))
        );
        assert_eq!(
            Sizes::combine(Sizes::default(), Sizes::default(), Footprint::new(1, 1)),
            None
        );
    }

    #[test]
    fn pair_serializes_as_vram_and_ram() {
        assert_eq!(
            format!("{}", Footprint::new(1 << 30, 512)),
            "vram 1.0 GiB, ram 512 B"
        );
        assert_eq!(Limits::new(Some(3), None).get(Resource::Ram), None);
        assert_eq!(Footprint::new(1, 2).map(|v| v * 2), Footprint::new(2, 4));
    }
}
