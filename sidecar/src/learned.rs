//! Learned sizes kept across restarts, standalone: a small JSON file beside the pool file
//! (`.<pool file>.learned.json`), written by the ticker when what was learned changes and read
//! back at start, so that a restarted sidecar admits with the sizes it measured before.
//!
//! A file that cannot be read or written never stops the sidecar: it starts without what was
//! learned, and says why in its log.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use modelpool_policy::{Footprint, LearnedSize};
use serde::{Deserialize, Serialize};

/// The largest file read back (a pool lists at most 64 models: a few KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// No model is larger than this: an entry above it is not a measurement.
const MAX_MODEL_BYTES: u64 = 1 << 50;

/// The file's format version.
const VERSION: u32 = 1;

/// Reading or writing the file.
#[derive(Debug, thiserror::Error)]
pub enum LearnedFileError {
    /// It could not be read.
    #[error("cannot read learned sizes from {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Over [`MAX_FILE_BYTES`].
    #[error("learned sizes file {path} is over {MAX_FILE_BYTES} bytes: not read")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not the format this sidecar writes.
    #[error("learned sizes file {path} is not valid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field.
        message: String,
    },
    /// It could not be written.
    #[error("cannot write learned sizes to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct LearnedFile {
    version: u32,
    models: BTreeMap<String, LearnedSize>,
}

/// The file beside `pool`: `.<pool file name>.learned.json`.
pub fn beside(pool: &Path) -> PathBuf {
    let name = pool
        .file_name()
        .map_or_else(|| "pool".into(), |n| n.to_string_lossy().into_owned());
    pool.with_file_name(format!(".{name}.learned.json"))
}

/// Reads the file; a missing one is an empty map.
pub fn read(path: &Path) -> Result<BTreeMap<String, LearnedSize>, LearnedFileError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(BTreeMap::new());
        }
        Err(source) => {
            return Err(LearnedFileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LearnedFileError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LearnedFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    parse(&bytes).map_err(|message| LearnedFileError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// Parses the file's bytes, refusing sizes no model has.
pub fn parse(bytes: &[u8]) -> Result<BTreeMap<String, LearnedSize>, String> {
    let file: LearnedFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != VERSION {
        return Err(format!("version {}: expected {VERSION}", file.version));
    }
    for (model, size) in &file.models {
        let sane = |f: Footprint| f.vram <= MAX_MODEL_BYTES && f.ram <= MAX_MODEL_BYTES;
        if !sane(size.peak) || !sane(size.declared) {
            return Err(format!(
                "models.{model}: a size over {} is not a measurement",
                modelpool_policy::human_bytes(MAX_MODEL_BYTES)
            ));
        }
    }
    Ok(file.models)
}

/// Writes the file whole (a temporary file renamed over it: a crash leaves the old one).
pub fn write(path: &Path, models: &BTreeMap<String, LearnedSize>) -> Result<(), LearnedFileError> {
    let error = |source| LearnedFileError::Write {
        path: path.to_owned(),
        source,
    };
    let file = LearnedFile {
        version: VERSION,
        models: models.clone(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|e| error(e.into()))?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text).map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> BTreeMap<String, LearnedSize> {
        BTreeMap::from([(
            "a".to_owned(),
            LearnedSize {
                declared: Footprint::new(0, 10 << 20),
                peak: Footprint::new(0, 40 << 20),
                load_seconds: Some(1.5),
            },
        )])
    }

    #[test]
    fn round_trip_beside_the_pool_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = beside(&dir.path().join("pool.yaml"));
        assert_eq!(path, dir.path().join(".pool.yaml.learned.json"));
        assert!(read(&path).unwrap().is_empty(), "missing: empty");
        write(&path, &sizes()).unwrap();
        assert_eq!(read(&path).unwrap(), sizes());
    }

    #[test]
    fn bad_files_are_refused_naming_what_is_wrong() {
        assert!(parse(b"not json").is_err());
        let error = parse(br#"{"version": 2, "models": {}}"#).unwrap_err();
        assert!(error.contains("version 2"), "{error}");
        let error = parse(
            br#"{"version": 1, "models": {"a": {"declared": {"vram": 0, "ram": 0}, "peak": {"vram": 0, "ram": 18446744073709551615}}}}"#,
        )
        .unwrap_err();
        assert!(error.starts_with("models.a:"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(read(&big), Err(LearnedFileError::TooLarge { .. })));
    }
}
