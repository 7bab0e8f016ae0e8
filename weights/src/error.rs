//! Why no estimate could be made. Every message names the file, the field and the value, and
//! what was expected; none quotes the file's bytes before its format has been recognised (a
//! link to some other file must not leak that file's content into a log).

use std::{path::PathBuf, time::Duration};

/// Why no estimate could be made.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The URI or path names nothing this crate can estimate.
    #[error("{what}: {reason}")]
    Unsupported {
        /// The URI or path.
        what: String,
        /// What is supported.
        reason: String,
    },
    /// A file or directory could not be read.
    #[error("failed to read {}: {source}", path.display())]
    Io {
        /// The path (as the sidecar sees it).
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A path or a link in it leads outside the directory it must stay in.
    #[error("{} {reason}: refused (links are followed only inside {})", path.display(), inside.display())]
    Escape {
        /// The path as given.
        path: PathBuf,
        /// Where it led.
        reason: String,
        /// The directory it must stay in.
        inside: PathBuf,
    },
    /// Not a regular file (a FIFO, a device, a socket): never opened.
    #[error("{} is {kind}, expected a regular file", path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is not of the format its name or place says.
    #[error("{} is not a {format} file: {reason}", path.display())]
    NotFormat {
        /// The path.
        path: PathBuf,
        /// `GGUF` or `safetensors`.
        format: &'static str,
        /// What gave it away (never the file's bytes).
        reason: String,
    },
    /// A header field has a value that cannot be right.
    #[error("{}: {field} is {value}, expected {expected}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `tensor "blk.0.attn_q.weight" type` or `header length`.
        field: String,
        /// The value found.
        value: String,
        /// What was expected.
        expected: String,
    },
    /// The header is larger than the read cap.
    #[error("{}: header larger than the {cap} bytes cap while reading {field}", path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// What was being read when the cap was hit.
        field: String,
        /// The cap.
        cap: u64,
    },
    /// Reading the header took longer than the time budget.
    #[error("{}: reading the header took longer than the {budget:?} budget", path.display())]
    TooSlow {
        /// The file.
        path: PathBuf,
        /// The budget.
        budget: Duration,
    },
}

impl WeightsError {
    pub(crate) fn invalid(
        path: &std::path::Path,
        field: impl Into<String>,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// A name taken from a file, fit for a message: at most 64 printable ASCII characters, quoted.
/// Only used once the file's format has been recognised.
pub(crate) fn shown(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if name.chars().count() > 64 {
        out.push('…');
    }
    format!("{out:?}")
}
