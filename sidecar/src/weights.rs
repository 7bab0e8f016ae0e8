//! Footprint estimates from a model's weights before its first load (DESIGN section 3:
//! declared, or estimated from the weights' header, then learned from measurement).
//!
//! Only the safetensors header is read (8 bytes of length, then a JSON table of tensors with
//! their byte ranges): the weights themselves are never touched, so this is cheap even for
//! many-GiB files.

use std::{fs::File, io::Read, path::Path};

/// A header bigger than this is refused (the format allows any size; real ones are KiBs).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why no estimate could be made.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Only local files are read.
    #[error("{0:?}: only file:// URIs of .safetensors files can be estimated")]
    Unsupported(String),
    /// The file could not be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a safetensors file.
    #[error("{path} is not a safetensors file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The bytes of the tensors a safetensors file at `uri` (`file:///...`) holds.
pub fn estimate_bytes(uri: &str) -> Result<u64, WeightsError> {
    let path = uri
        .strip_prefix("file://")
        .filter(|p| p.ends_with(".safetensors"))
        .ok_or_else(|| WeightsError::Unsupported(uri.to_owned()))?;
    safetensors_bytes(Path::new(path))
}

/// The bytes of the tensors in a safetensors file, from its header alone.
pub fn safetensors_bytes(path: &Path) -> Result<u64, WeightsError> {
    let shown = path.display().to_string();
    let read_error = |source| WeightsError::Read {
        path: shown.clone(),
        source,
    };
    let format_error = |reason: String| WeightsError::Format {
        path: shown.clone(),
        reason,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(read_error)?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER_BYTES {
        return Err(format_error(format!("header of {length} bytes")));
    }
    let mut header =
        vec![0u8; usize::try_from(length).map_err(|_| format_error("header too large".into()))?];
    file.read_exact(&mut header).map_err(read_error)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format_error(format!("header is not JSON: {e}")))?;
    let mut total = 0u64;
    for (name, tensor) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = tensor["data_offsets"]
            .as_array()
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| format_error(format!("tensor {name:?} has no data_offsets")))?;
        total = total.saturating_add(offsets.1.saturating_sub(offsets.0));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 7);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn sums_the_tensors_of_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let header = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1024,256],"data_offsets":[0,1048576]},"b":{"dtype":"F32","shape":[256],"data_offsets":[1048576,1049600]}}"#;
        write(&path, header, 1_049_600);
        let uri = format!("file://{}", path.display());
        assert_eq!(estimate_bytes(&uri).unwrap(), 1_049_600);
    }

    #[test]
    fn refuses_what_it_cannot_read_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        write(&path, "not json", 0);
        let error = safetensors_bytes(&path).unwrap_err().to_string();
        assert!(
            error.contains("is not a safetensors file: header is not JSON"),
            "{error}"
        );
        let error = estimate_bytes("s3://bucket/m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(error.contains("only file:// URIs"), "{error}");
        let error = estimate_bytes("file:///nonexistent/m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("failed to read /nonexistent/m.safetensors"),
            "{error}"
        );
    }
}
