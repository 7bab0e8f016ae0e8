//! App sessions and the leases they hold: the records, and the names they have on the wire
//! (`s-7`, `l-7`).

use std::time::Duration;

use modelpool_policy::{LeaseId, SessionId, human_bytes};

use crate::{api::wire::AppReadings, measure::GpuReading};

/// No GPU has more memory than this: a larger "total" is not a reading.
pub const MAX_DEVICE_BYTES: u64 = 4 << 40;

/// How far an app's device total may be from the total of a GPU the sidecar reads itself
/// (the CUDA runtime and NVML round differently).
const TOTAL_TOLERANCE: f64 = 0.05;

/// Checks readings an app sent on its heartbeat: each number possible, the source a short
/// tag, the device total one of the sidecar's own GPUs when it reads any (`own`). The error
/// names the field, the value and what was expected.
pub fn check_readings(readings: &AppReadings, own: &GpuReading) -> Result<(), String> {
    let source = &readings.source;
    if source.is_empty()
        || source.len() > 32
        || !source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "source {source:?}: expected 1 to 32 letters, digits, '_', '.' or '-'"
        ));
    }
    let bytes = |n: u64| format!("{n} ({})", human_bytes(n));
    let total = readings.device_vram_total_bytes;
    if let Some(total) = total {
        if total == 0 || total > MAX_DEVICE_BYTES {
            return Err(format!(
                "device_vram_total_bytes {}: expected more than 0 and at most {} (no GPU has more)",
                bytes(total),
                human_bytes(MAX_DEVICE_BYTES)
            ));
        }
        if own.up()
            && !own.devices.iter().any(|d| {
                (d.total_bytes as f64 - total as f64).abs()
                    <= d.total_bytes as f64 * TOTAL_TOLERANCE
            })
        {
            let theirs: Vec<String> = own.devices.iter().map(|d| bytes(d.total_bytes)).collect();
            return Err(format!(
                "device_vram_total_bytes {} matches none of the GPUs the sidecar reads itself ({})",
                bytes(total),
                theirs.join(", ")
            ));
        }
    }
    for (field, value) in [
        ("device_vram_used_bytes", readings.device_vram_used_bytes),
        ("process_vram_bytes", readings.process_vram_bytes),
    ] {
        let Some(value) = value else { continue };
        let limit = total.unwrap_or(MAX_DEVICE_BYTES);
        if value > limit {
            let what = if total.is_some() {
                "device_vram_total_bytes"
            } else {
                "the largest GPU there is"
            };
            return Err(format!(
                "{field} {} is more than {what} ({})",
                bytes(value),
                bytes(limit)
            ));
        }
    }
    Ok(())
}

/// The holder of instances loaded by the `Http` driver: the app server itself.
pub const APP_HOLDER: SessionId = SessionId(0);

/// `s-7` (`app` for [`APP_HOLDER`]).
pub fn session_name(id: SessionId) -> String {
    if id == APP_HOLDER {
        "app".to_owned()
    } else {
        format!("s-{}", id.0)
    }
}

/// `l-7`.
pub fn lease_name(id: LeaseId) -> String {
    format!("l-{}", id.0)
}

/// The number in `s-7` / `l-7`.
pub fn parse_id(text: &str, prefix: &str) -> Option<u64> {
    text.strip_prefix(prefix)?.parse().ok()
}

/// The first session id of this run: unique across restarts, so that an app that outlived a
/// restarted sidecar does not find its old id given to another process's new session.
pub fn first_session_id() -> u64 {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    u64::try_from(millis)
        .unwrap_or(0)
        .saturating_mul(1000)
        .max(1)
}

/// An open app session. Times are the core's clock (time since the sidecar started).
#[derive(Debug, Clone)]
pub struct Session {
    /// The app process.
    pub pid: u32,
    /// Its name.
    pub app: String,
    /// Models it registered loaders for.
    pub models: Vec<String>,
    /// Last heartbeat (or creation).
    pub last_seen: Duration,
    /// The heartbeat interval asked of it (two missed: the session ends).
    pub heartbeat: Duration,
    /// When it opened.
    pub opened: Duration,
    /// Its latest readings, and when they came.
    pub readings: Option<(AppReadings, Duration)>,
    /// Whether the sidecar sees the pid (same pid namespace: shareProcessNamespace). If not,
    /// liveness is by heartbeats only and the process's memory is not measured.
    pub pid_visible: bool,
    /// The process's VmRSS at the last reading: the level a load adds to and an unload falls
    /// from.
    pub last_rss: Option<u64>,
    /// The process's VRAM (NVML, per process) at the last reading.
    pub last_vram: Option<u64>,
}

/// Who a lease is for.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The session that asked (and releases it).
    pub client: SessionId,
    /// The session holding the instance (the client, or [`APP_HOLDER`]).
    pub holder: SessionId,
    /// The model.
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(used: Option<u64>, total: Option<u64>) -> AppReadings {
        AppReadings {
            source: "torch".to_owned(),
            device_vram_used_bytes: used,
            device_vram_total_bytes: total,
            process_vram_bytes: None,
        }
    }

    fn own(total: Option<u64>) -> GpuReading {
        match total {
            None => GpuReading::down("no GPU".to_owned()),
            Some(total_bytes) => GpuReading {
                devices: vec![crate::measure::GpuDevice {
                    index: 0,
                    uuid: "GPU-0".to_owned(),
                    name: "test".to_owned(),
                    total_bytes,
                    used_bytes: 0,
                    source: crate::measure::Source::Nvml,
                }],
                down_reason: None,
            },
        }
    }

    #[test]
    fn impossible_readings_are_refused_naming_the_field() {
        const GIB: u64 = 1 << 30;
        assert_eq!(
            check_readings(&readings(Some(3 * GIB), Some(8 * GIB)), &own(None)),
            Ok(())
        );
        assert_eq!(check_readings(&readings(None, None), &own(None)), Ok(()));
        // The attack that evicted another session's model: 1e19 used of 1.
        let error = check_readings(
            &readings(Some(10_000_000_000_000_000_000), Some(1)),
            &own(None),
        )
        .unwrap_err();
        assert!(
            error.starts_with("device_vram_used_bytes 10000000000000000000"),
            "{error}"
        );
        assert!(error.contains("device_vram_total_bytes (1 "), "{error}");
        let error = check_readings(&readings(None, Some(0)), &own(None)).unwrap_err();
        assert!(error.starts_with("device_vram_total_bytes 0"), "{error}");
        let error = check_readings(&readings(None, Some(u64::MAX)), &own(None)).unwrap_err();
        assert!(error.contains("at most 4.0 TiB"), "{error}");
        let error = check_readings(&readings(Some(u64::MAX), None), &own(None)).unwrap_err();
        assert!(error.contains("the largest GPU there is"), "{error}");
        let mut bad_source = readings(None, None);
        bad_source.source = "x".repeat(33);
        assert!(
            check_readings(&bad_source, &own(None))
                .unwrap_err()
                .starts_with("source")
        );
        bad_source.source = "torch\n{}".to_owned();
        assert!(check_readings(&bad_source, &own(None)).is_err());
        // With a GPU of its own, the sidecar takes only totals that match one of its devices.
        assert_eq!(
            check_readings(&readings(Some(GIB), Some(80 * GIB)), &own(Some(80 * GIB))),
            Ok(())
        );
        let error =
            check_readings(&readings(Some(GIB), Some(8 * GIB)), &own(Some(80 * GIB))).unwrap_err();
        assert!(error.contains("matches none of the GPUs"), "{error}");
        assert!(error.contains("80.0 GiB"), "{error}");
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(session_name(SessionId(7)), "s-7");
        assert_eq!(session_name(APP_HOLDER), "app");
        assert_eq!(lease_name(LeaseId(3)), "l-3");
        assert_eq!(parse_id("s-7", "s-"), Some(7));
        assert_eq!(parse_id("l-x", "l-"), None);
        assert_eq!(parse_id("7", "s-"), None);
        assert!(first_session_id() >= 1);
    }
}
