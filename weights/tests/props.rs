//! Property tests (stable Rust's stand-in for the fuzz targets in `fuzz/`): whatever the bytes,
//! the readers answer (an estimate or an error) without panicking, and an estimate they give
//! is never more than the file holds.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use modelpool_weights::{Limits, gguf, safetensors};
use proptest::prelude::*;

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for (at, value) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = *value;
        }
    }
    if let Some(cut) = cut
        && !bytes.is_empty()
    {
        bytes.truncate(cut % bytes.len());
    }
    bytes
}

fn check_gguf(bytes: &[u8]) {
    if let Ok(header) = gguf::parse_bytes(bytes, bytes.len() as u64, &Limits::default()) {
        assert!(header.tensor_bytes <= bytes.len() as u64);
        let _ = header.kv_cache(std::path::Path::new("x"), None, 2);
    }
}

fn check_safetensors(bytes: &[u8]) {
    if let Ok(summary) = safetensors::parse_bytes(bytes, bytes.len() as u64, &Limits::default()) {
        assert!(summary.bytes <= bytes.len() as u64);
    }
}

proptest! {
    // Each case writes nothing to disk but parses in a debug build: a few hundred per run keep
    // the suite fast; `fuzz/` runs the same bodies far longer.
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn gguf_any_bytes(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend(tail);
        check_gguf(&bytes);
    }

    #[test]
    fn gguf_mutated(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in proptest::option::of(any::<usize>())) {
        check_gguf(&mutate(llama(2, 64, 4, 2, 256), &edits, cut));
    }

    #[test]
    fn safetensors_any_bytes(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = (tail.len() as u64).to_le_bytes().to_vec();
        bytes.push(b'{');
        bytes.extend(tail);
        check_safetensors(&bytes);
    }

    #[test]
    fn safetensors_mutated(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in proptest::option::of(any::<usize>())) {
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
        check_safetensors(&mutate(safetensors_bytes(header, 22), &edits, cut));
    }
}
