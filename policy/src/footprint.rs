//! Bytes held on the GPU and in host memory, as one value.

use std::fmt;

use serde::Serialize;

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

/// Bytes of VRAM and RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    /// GPU bytes.
    pub vram: u64,
    /// Host bytes.
    pub ram: u64,
}

impl Footprint {
    /// A footprint of `vram` and `ram` bytes.
    pub const fn new(vram: u64, ram: u64) -> Self {
        Self { vram, ram }
    }

    /// The bytes of one resource.
    pub fn get(self, resource: Resource) -> u64 {
        match resource {
            Resource::Vram => self.vram,
            Resource::Ram => self.ram,
        }
    }

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

impl fmt::Display for Footprint {
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
