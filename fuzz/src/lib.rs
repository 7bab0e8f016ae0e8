//! The fuzz targets' bodies: each takes any bytes, must not panic, and checks what must hold
//! for the inputs it accepts (round trips, sizes within the file).

use std::str::FromStr;

use modelpool_crds::{Quantity, human_bytes, parse_bytes, parse_pool, report::PodReport};
use modelpool_weights::{Limits, gguf, safetensors};

/// The pool YAML reader: a pool accepted once is accepted again after a round trip through
/// the YAML writer.
pub fn pool_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pool) = parse_pool(text, "fuzz") else {
        return;
    };
    let Ok(again) = serde_saphyr::to_string(&pool) else {
        panic!("an accepted pool cannot be written back as YAML");
    };
    if let Err(error) = parse_pool(&again, "fuzz round trip") {
        panic!("an accepted pool is refused after a round trip: {error}\n{again}");
    }
}

/// Quantities (`1Gi`, `500M`, `1.5e3`): a parsed size prints and parses back to itself.
pub fn quantity(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_bytes(text);
    assert_eq!(parsed, Quantity(text.to_owned()).bytes());
    if let Ok(bytes) = parsed {
        assert_eq!(Quantity::from_bytes(bytes).bytes(), Ok(bytes));
        let _ = human_bytes(bytes);
    }
}

/// Durations (`5m`, `1h30m`): a parsed duration prints and parses back to itself.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The pool's own entry point: it must refuse, never panic (kube's parser alone panics on
    // "0s-55m0s5m5").
    if let Ok(duration) = modelpool_crds::v1alpha1::parse_duration(text) {
        let printed = duration.to_string();
        assert_eq!(
            kube::core::Duration::from_str(&printed),
            Ok(duration),
            "{text:?} printed as {printed:?}"
        );
    }
}

/// The pod report annotation: a report read is written and read back the same.
pub fn pod_report(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(report) = PodReport::from_annotation(text) {
        let written = report.to_annotation();
        assert_eq!(PodReport::from_annotation(&written).ok(), Some(report));
    }
}

/// The safetensors header reader: never more bytes than the file holds.
pub fn safetensors(data: &[u8]) {
    if let Ok(summary) = safetensors::parse_bytes(data, data.len() as u64, &Limits::default()) {
        assert!(summary.bytes <= data.len() as u64);
    }
}

/// The GGUF header reader: never more bytes than the file holds; the KV-cache arithmetic on
/// whatever metadata it kept never panics.
pub fn gguf(data: &[u8]) {
    if let Ok(header) = gguf::parse_bytes(data, data.len() as u64, &Limits::default()) {
        assert!(header.tensor_bytes <= data.len() as u64);
        let _ = header.kv_cache(std::path::Path::new("<bytes>"), None, 2);
        let _ = header.kv_cache(std::path::Path::new("<bytes>"), Some(u64::MAX), 2);
    }
}
