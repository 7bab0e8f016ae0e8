//! `modelpool-sidecar validate FILE...`: the pool files read exactly as the sidecar reads
//! `--pool` at startup (same reader, same checks, same messages), for CI pipelines.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use modelpool_policy::human_bytes;

use crate::pool;

/// What `validate` prints and whether every file passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// One line (or more) per file.
    pub text: String,
    /// Every file valid.
    pub ok: bool,
}

/// An error with its causes, as the sidecar logs it at startup.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Checks each file.
pub fn run(files: &[PathBuf]) -> Report {
    let mut text = String::new();
    let mut ok = true;
    // The reclaim timeout only fills the engine's config; it does not change validity.
    let reclaim_timeout = Duration::from_secs(10);
    for file in files {
        match pool::load(file, reclaim_timeout) {
            Ok(loaded) => {
                let info = &loaded.info;
                let ceiling = |c: Option<u64>| c.map_or_else(|| "none".to_owned(), human_bytes);
                let _ = writeln!(
                    text,
                    "{}: ok: pool {} | mode {} | driver {} | {} models | ceilings VRAM {}, RAM {}",
                    file.display(),
                    info.name,
                    info.mode.as_str(),
                    info.driver.as_str(),
                    info.models.len(),
                    ceiling(info.limits.vram),
                    ceiling(info.limits.ram),
                );
            }
            Err(error) => {
                ok = false;
                let name = file.display().to_string();
                let chain = error_chain(&error);
                // The reader's errors usually start with the path already.
                let reason = chain.strip_prefix(&format!("{name}: ")).unwrap_or(&chain);
                let _ = writeln!(text, "{name}: invalid: {reason}");
            }
        }
    }
    Report { text, ok }
}
