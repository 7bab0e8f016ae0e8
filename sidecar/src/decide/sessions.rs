//! App sessions and the leases they hold: the records, and the names they have on the wire
//! (`s-7`, `l-7`).

use std::time::Duration;

use modelpool_policy::{LeaseId, SessionId};

use crate::api::wire::AppReadings;

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
