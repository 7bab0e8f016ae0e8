//! `modelpool-sidecar status`: a running sidecar's state as a table, and the seed's memory line.

use std::fmt::Write as _;

use serde_json::Value;

use crate::{
    args::StatusArgs,
    client::{Client, ClientError},
    measure::{MemoryLine, human},
};

/// Why the state could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No answer.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An answer that is not the state.
    #[error("GET /v1/state answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Body.
        body: String,
    },
}

/// Fetches and prints the state.
pub fn run(args: &StatusArgs) -> Result<String, StatusError> {
    let response = Client::unix(&args.socket).get("/v1/state")?;
    if response.status != 200 {
        return Err(StatusError::Status {
            status: response.status,
            body: response.text(),
        });
    }
    let state = response.json();
    if args.json {
        return Ok(serde_json::to_string_pretty(&state).unwrap_or_default());
    }
    Ok(render(&state))
}

fn u64_at(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("-")
}

fn bytes_or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), human)
}

/// The table and memory lines for a `/v1/state` body.
pub fn render(state: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Pool {}{} | mode {} | driver {} | ceilings VRAM {}, RAM {}",
        str_at(state, "/pool/name"),
        match str_at(state, "/pool/namespace") {
            "" | "-" => String::new(),
            ns => format!(" ({ns})"),
        },
        str_at(state, "/pool/mode"),
        str_at(state, "/pool/driver"),
        bytes_or_dash(u64_at(state, "/ceiling_bytes/vram")),
        bytes_or_dash(u64_at(state, "/ceiling_bytes/ram")),
    );
    let header = [
        "MODEL", "SESSION", "PID", "STATE", "LEASES", "VRAM", "RAM", "IDLE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for model in state
        .get("models")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        rows.push(vec![
            str_at(model, "/model").to_owned(),
            str_at(model, "/session").to_owned(),
            u64_at(model, "/pid").map_or("-".into(), |p| p.to_string()),
            str_at(model, "/state").to_owned(),
            u64_at(model, "/leases").unwrap_or(0).to_string(),
            bytes_or_dash(u64_at(model, "/vram_bytes")),
            bytes_or_dash(u64_at(model, "/ram_bytes")),
            model
                .get("idle_s")
                .and_then(Value::as_f64)
                .map_or("-".into(), |s| format!("{s:.1}s")),
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
    let sessions = state.get("sessions").and_then(Value::as_array);
    let _ = writeln!(
        out,
        "Held by the pool: VRAM {}, RAM {} | lost VRAM {}, RAM {} | waiting acquires {} | sessions {}",
        bytes_or_dash(u64_at(state, "/held_bytes/vram")),
        bytes_or_dash(u64_at(state, "/held_bytes/ram")),
        bytes_or_dash(u64_at(state, "/lost_bytes/vram")),
        bytes_or_dash(u64_at(state, "/lost_bytes/ram")),
        u64_at(state, "/queue").unwrap_or(0),
        sessions.map_or(0, Vec::len),
    );
    let gpu_up = state
        .pointer("/gpu/up")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let line = MemoryLine {
        ram_used: u64_at(state, "/ram_used_bytes").unwrap_or(0),
        ram_total: u64_at(state, "/ram_total_bytes").unwrap_or(0),
        vram: if gpu_up {
            Ok((
                u64_at(state, "/vram_used_bytes").unwrap_or(0),
                u64_at(state, "/vram_total_bytes").unwrap_or(0),
            ))
        } else {
            Err(str_at(state, "/gpu/reason")
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
        let state = json!({
            "pool": {"name": "cogvideo", "namespace": "video", "mode": "Aggressive", "driver": "Sdk"},
            "ceiling_bytes": {"vram": 20u64 << 30, "ram": null},
            "models": [{"model": "t2v", "session": "s-1", "pid": 42, "state": "loaded", "leases": 1,
                        "vram_bytes": 12u64 << 30, "ram_bytes": 2u64 << 30, "idle_s": 0.0}],
            "held_bytes": {"vram": 12u64 << 30, "ram": 2u64 << 30},
            "lost_bytes": {"vram": 0, "ram": 0},
            "queue": 0, "sessions": [{}],
            "ram_used_bytes": (23u64 << 30) / 10, "ram_total_bytes": 20u64 << 30,
            "gpu": {"up": false, "reason": "no GPU: libnvidia-ml.so.1 not found"},
        });
        let text = render(&state);
        assert!(text.contains("t2v    s-1      42   loaded"), "{text}");
        assert!(
            text.contains("RAM 2.3/20.0 GiB (11.5%) | VRAM no GPU (libnvidia-ml.so.1 not found)"),
            "{text}"
        );
        assert!(text.contains("ceilings VRAM 20.0 GiB, RAM -"), "{text}");
    }
}
