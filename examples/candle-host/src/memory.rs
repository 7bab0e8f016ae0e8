//! The memory line logged before and after each load and unload, like the seed's
//! `RAM used | VRAM used/total` lines: this process's resident memory and the device's use.

use crate::gpu::Gpu;

/// This process's resident set (`VmRSS`), bytes; 0 where `/proc` is not available.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes as GiB with one decimal.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `RSS 1.2 GiB | VRAM 10.3/79.1 GiB (device)` or `RSS 1.2 GiB | VRAM no GPU`.
pub fn line(gpu: Option<&Gpu>) -> String {
    let rss = gib(rss_bytes());
    match gpu.map(Gpu::mem_info) {
        Some(Ok((free, total))) => format!(
            "RSS {rss} | VRAM {}/{} (device)",
            gib((total - free) as u64).trim_end_matches(" GiB"),
            gib(total as u64)
        ),
        Some(Err(error)) => format!("RSS {rss} | VRAM unreadable ({error})"),
        None => format!("RSS {rss} | VRAM no GPU"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_formats_without_gpu() {
        assert!(rss_bytes() > 0);
        assert_eq!(gib(3 << 29), "1.5 GiB");
        let text = line(None);
        assert!(
            text.starts_with("RSS ") && text.ends_with("| VRAM no GPU"),
            "{text}"
        );
    }
}
