//! Reading a `ModelPool` manifest from YAML (the sidecar's standalone `--pool FILE`).
//!
//! Three passes, so every error names the field: YAML to a JSON value (syntax errors with
//! line and column), the value to the typed pool through `serde_path_to_error` (type errors
//! with their path), then [`validate_pool`] (meaning, with the numbers). Unknown fields are
//! refused too: a typo such as `idleTtl` must not silently fall back to a default.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{
    API_VERSION,
    v1alpha1::ModelPool,
    validate::{FieldError, FieldErrors, validate_pool},
};

/// Why a pool manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PoolFileError {
    /// The file could not be read.
    #[error("failed to read pool file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block the reader forever; a device never ends).
    #[error("pool file {path} is {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead: "a FIFO", "a directory", ...
        kind: &'static str,
    },
    /// Over [`MAX_POOL_FILE_BYTES`].
    #[error(
        "pool file {path} is over the limit of {MAX_POOL_FILE_BYTES} bytes (1 MiB); a pool of 64 models takes a few KiB"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not YAML.
    #[error("{origin}: not valid YAML: {message}")]
    Yaml {
        /// Where the text came from.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// YAML, but not a valid pool.
    #[error("{origin}: {errors}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// Each problem with its field.
        errors: FieldErrors,
    },
}

impl PoolFileError {
    /// The field problems, if the manifest parsed as YAML.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors, .. } => &errors.0,
            _ => &[],
        }
    }
}

/// Largest pool file read.
pub const MAX_POOL_FILE_BYTES: u64 = 1 << 20;

/// Reads and validates a pool manifest from a file: a regular file (a symlink to one, as a
/// mounted ConfigMap is, is fine) of at most [`MAX_POOL_FILE_BYTES`].
pub fn load_pool_file(path: &Path) -> Result<ModelPool, PoolFileError> {
    use std::io::Read as _;
    let read = |source| PoolFileError::Read {
        path: path.to_owned(),
        source,
    };
    let kind = std::fs::metadata(path).map_err(read)?.file_type();
    if !kind.is_file() {
        return Err(PoolFileError::NotRegular {
            path: path.to_owned(),
            kind: kind_name(&kind),
        });
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_POOL_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_POOL_FILE_BYTES {
        return Err(PoolFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse_pool(&text, &path.display().to_string())
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Parses and validates a pool manifest; `origin` names it in errors (a file path).
pub fn parse_pool(text: &str, origin: &str) -> Result<ModelPool, PoolFileError> {
    let invalid = |errors: Vec<FieldError>| PoolFileError::Invalid {
        origin: origin.to_owned(),
        errors: FieldErrors(errors),
    };
    let value: Value = serde_saphyr::from_str(text).map_err(|error| PoolFileError::Yaml {
        origin: origin.to_owned(),
        message: error.to_string(),
    })?;
    if !value.is_object() {
        return Err(invalid(vec![FieldError {
            field: "(document)".into(),
            message:
                "expected a ModelPool manifest (a mapping with apiVersion, kind, metadata, spec)"
                    .into(),
        }]));
    }

    let mut errors = Vec::new();
    match value.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => errors.push(FieldError {
            field: "apiVersion".into(),
            message: format!(
                "{} is not supported (expected {API_VERSION:?})",
                describe(other)
            ),
        }),
    }
    match value.get("kind").and_then(Value::as_str) {
        Some("ModelPool") => {}
        other => errors.push(FieldError {
            field: "kind".into(),
            message: format!(
                "{} is not supported (expected \"ModelPool\")",
                describe(other)
            ),
        }),
    }
    if !errors.is_empty() {
        return Err(invalid(errors));
    }

    let pool: ModelPool = serde_path_to_error::deserialize(value.clone()).map_err(|error| {
        let field = error.path().to_string();
        invalid(vec![FieldError {
            field: if field == "." {
                "(document)".into()
            } else {
                field
            },
            message: error.into_inner().to_string(),
        }])
    })?;

    let echoed = serde_json::to_value(&pool).map_err(|error| {
        invalid(vec![FieldError {
            field: "(document)".into(),
            message: format!("failed to re-encode the pool: {error}"),
        }])
    })?;
    let mut unknown = Vec::new();
    // `status` is written by the operator; `metadata` is Kubernetes' own and open-ended.
    for key in ["spec"] {
        if let (Some(given), Some(known)) = (value.get(key), echoed.get(key)) {
            find_unknown_fields(key, given, known, &mut unknown);
        }
    }
    if !unknown.is_empty() {
        return Err(invalid(unknown));
    }

    validate_pool(&pool).map_err(|errors| invalid(errors.0))?;
    Ok(pool)
}

fn describe(value: Option<&str>) -> String {
    value.map_or_else(|| "missing".to_owned(), |v| format!("{v:?}"))
}

fn find_unknown_fields(path: &str, given: &Value, known: &Value, out: &mut Vec<FieldError>) {
    match (given, known) {
        (Value::Object(given), Value::Object(known)) => {
            for (key, value) in given {
                let child = format!("{path}.{key}");
                match known.get(key) {
                    Some(known_value) => find_unknown_fields(&child, value, known_value, out),
                    None if value.is_null() => {}
                    None => {
                        let mut expected: Vec<&str> = known.keys().map(String::as_str).collect();
                        expected.sort_unstable();
                        let hint = expected
                            .iter()
                            .find(|k| k.eq_ignore_ascii_case(key))
                            .map(|k| format!(" (did you mean {k:?}?)"))
                            .unwrap_or_default();
                        out.push(FieldError {
                            field: child,
                            message: format!("unknown field{hint}"),
                        });
                    }
                }
            }
        }
        (Value::Array(given), Value::Array(known)) => {
            for (index, (g, k)) in given.iter().zip(known).enumerate() {
                find_unknown_fields(&format!("{path}[{index}]"), g, k, out);
            }
        }
        _ => {}
    }
}
