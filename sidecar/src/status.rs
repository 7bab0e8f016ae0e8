//! `modelpool-sidecar status`: a running sidecar's state as a table, and the seed's memory line.

use std::{fmt::Write as _, time::Duration};

use modelpool_policy::human_bytes;

use crate::{
    api::wire,
    args::{DEFAULT_SOCKET, StatusArgs},
    client::{Client, ClientError},
    measure::MemoryLine,
};

/// Why the state could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing listens on the socket (no file, or a file no sidecar listens on).
    #[error(
        "no sidecar answers on {socket} ({source}). Check: is the sidecar running (its container's state and logs)? Is this its socket (--socket or MODELPOOL_SOCKET, default {default})? In a pod, run it in the sidecar's container: kubectl exec POD -c modelpool-sidecar -- modelpool-sidecar status"
    )]
    NotRunning {
        /// The socket tried.
        socket: String,
        /// The connect error.
        source: std::io::Error,
        /// The default socket path.
        default: &'static str,
    },
    /// Connected, but no answer in time (a paused or overloaded sidecar).
    #[error(
        "the sidecar on {socket} accepted the connection but did not answer GET /v1/state within {timeout_s} s ({source}): is it paused or stuck? Its logs and /healthz on the metrics port tell more"
    )]
    NoAnswer {
        /// The socket tried.
        socket: String,
        /// How long we waited.
        timeout_s: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No answer.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A 200 whose body is not the state this version knows.
    #[error("GET /v1/state answered a body this status command cannot read ({message}): {body}")]
    Decode {
        /// What did not parse.
        message: String,
        /// Body.
        body: String,
    },
    /// An answer that is not the state.
    #[error("GET /v1/state answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Body.
        body: String,
    },
}

/// How long `status` waits for the state.
const STATUS_TIMEOUT_S: u64 = 5;

/// Fetches and prints the state.
pub fn run(args: &StatusArgs) -> Result<String, StatusError> {
    let timeout = Duration::from_secs(STATUS_TIMEOUT_S);
    let socket = args.socket.display().to_string();
    let response = Client::unix(&args.socket)
        .with_timeout(timeout)
        .get("/v1/state")
        .map_err(|error| match error {
            ClientError::Connect { source, .. } => StatusError::NotRunning {
                socket: socket.clone(),
                source,
                default: DEFAULT_SOCKET,
            },
            ClientError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                StatusError::NoAnswer {
                    socket: socket.clone(),
                    timeout_s: STATUS_TIMEOUT_S,
                    source,
                }
            }
            other => StatusError::Client(other),
        })?;
    if response.status != 200 {
        return Err(StatusError::Status {
            status: response.status,
            body: response.text(),
        });
    }
    if args.json {
        // The body as the sidecar sent it: fields a newer sidecar adds are kept.
        let raw: serde_json::Value = response.json();
        return Ok(serde_json::to_string_pretty(&raw).unwrap_or_default());
    }
    let state: wire::State =
        serde_json::from_slice(&response.body).map_err(|error| StatusError::Decode {
            message: error.to_string(),
            body: response.text(),
        })?;
    Ok(render(&state))
}

fn bytes_or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), human_bytes)
}

/// The table and memory lines for a `/v1/state` body.
pub fn render(state: &wire::State) -> String {
    let mut out = String::new();
    let pool = &state.pool;
    let _ = writeln!(
        out,
        "Pool {}{} | mode {} | driver {} | ceilings VRAM {}, RAM {}",
        pool.name,
        if pool.namespace.is_empty() {
            String::new()
        } else {
            format!(" ({})", pool.namespace)
        },
        pool.mode.as_str(),
        pool.driver.as_str(),
        bytes_or_dash(state.ceiling_bytes.vram),
        bytes_or_dash(state.ceiling_bytes.ram),
    );
    let header = [
        "MODEL", "SESSION", "PID", "STATE", "LEASES", "VRAM", "RAM", "IDLE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for model in &state.models {
        rows.push(vec![
            model.model.clone(),
            model.session.clone(),
            model.pid.map_or("-".into(), |p| p.to_string()),
            model.state.clone(),
            model.leases.to_string(),
            human_bytes(model.vram_bytes),
            human_bytes(model.ram_bytes),
            format!("{:.1}s", model.idle_s),
        ]);
    }
    if rows.len() == 1 {
        out.push_str("No models loaded.\n");
    } else {
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
    }
    let _ = writeln!(
        out,
        "Held by the pool: VRAM {}, RAM {} | lost VRAM {}, RAM {} | waiting acquires {} | sessions {}",
        human_bytes(state.held_bytes.vram),
        human_bytes(state.held_bytes.ram),
        human_bytes(state.lost_bytes.vram),
        human_bytes(state.lost_bytes.ram),
        state.queue,
        state.sessions.len(),
    );
    let line = MemoryLine {
        ram_used: state.ram_used_bytes,
        ram_total: state.ram_total_bytes,
        vram: if state.gpu.up {
            Ok((state.vram_used_bytes, state.vram_total_bytes))
        } else {
            Err(state
                .gpu
                .reason
                .as_deref()
                .unwrap_or("-")
                .trim_start_matches("no GPU: ")
                .to_owned())
        },
    };
    let _ = writeln!(out, "{line}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_models_and_the_memory_line() {
        let state: wire::State = serde_json::from_value(json!({
            "ram_used_gb": 2.3, "ram_total_gb": 20.0, "ram_percent": 11.5,
            "vram_allocated_gb": 0.0, "vram_total_gb": 0.0, "vram_percent": 0.0,
            "ram_used_bytes": (23u64 << 30) / 10, "ram_total_bytes": 20u64 << 30,
            "ram_limit_bytes": null, "vram_used_bytes": 0, "vram_total_bytes": 0,
            "gpu": {"up": false, "reason": "no GPU: libnvidia-ml.so.1 not found"},
            "sources": {"ram": "proc", "vram": null, "process_ram": "proc", "process_vram": null},
            "pool": {"name": "cogvideo", "namespace": "video", "mode": "Aggressive", "driver": "Sdk",
                     "enforcement": "Evict", "limits": {"vram": 20u64 << 30, "ram": null}, "models": []},
            "ceiling_bytes": {"vram": 20u64 << 30, "ram": null},
            "models": [{"model": "t2v", "generation": 1, "session": "s-1", "pid": 42, "app": "x",
                        "state": "loaded", "leases": 1,
                        "vram_bytes": 12u64 << 30, "ram_bytes": 2u64 << 30,
                        "declared": {"vram": 0, "ram": 0}, "measured": null,
                        "peak": {"vram": 0, "ram": 0}, "idle_s": 0.0, "pinned": false}],
            "held_bytes": {"vram": 12u64 << 30, "ram": 2u64 << 30},
            "lost_bytes": {"vram": 0, "ram": 0},
            "queue": 0,
            "sessions": [{"session": "s-1", "pid": 42, "app": "x", "models": ["t2v"], "leases": 1,
                          "last_heartbeat_ms": 5}],
            "counters": {"loads": 1, "load_failures": 0, "unloads": {}, "refusals": {},
                         "not_reclaimed": 0, "ceiling_breaches": {}},
            "shutting_down": false,
        }))
        .unwrap();
        let text = render(&state);
        assert!(text.contains("t2v    s-1      42   loaded"), "{text}");
        assert!(
            text.contains("RAM 2.3/20.0 GiB (11.5%) | VRAM no GPU (libnvidia-ml.so.1 not found)"),
            "{text}"
        );
        assert!(text.contains("ceilings VRAM 20.0 GiB, RAM -"), "{text}");
    }
}
