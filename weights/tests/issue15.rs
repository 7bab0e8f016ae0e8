//! The parser failures of issue 15, reproduced against the sidecar's first estimator
//! (`sidecar/src/weights.rs` before this crate) and passing here:
//! - a 100 MiB header took 18 s and 2.1 GB at start-up: refused now at once (it is above the
//!   header cap), and a header under the cap is streamed within the time budget;
//! - offsets `[0, u64::MAX]` gave a 16 EiB estimate: refused, naming the field;
//! - a `.safetensors` link to another file logged that file's first bytes: the link is not
//!   followed out of the model's directory, and no message quotes an unrecognised file.
#![allow(clippy::unwrap_used)]

mod common;

use std::{os::unix::fs::symlink, time::Duration};

use common::*;
use modelpool_weights::{Limits, Options, Root, estimate, estimate_uri};

#[test]
fn a_100_mib_header_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    // 100 MiB of valid JSON: one tensor and a huge metadata string (the file is sparse).
    let mut bytes = (100u64 << 20).to_le_bytes().to_vec();
    bytes.extend(br#"{"__metadata__":{"x":""#);
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(8 + (100 << 20)).unwrap();
    let error = estimate(&Root::host(), &path, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        error
            .contains("header length is 104857600, expected at most the 67108864 bytes header cap"),
        "{error}"
    );
}

#[test]
fn a_large_header_under_the_cap_streams_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.safetensors");
    // ~6 MiB of header: 60 000 tensors of 4 bytes each.
    let n = 60_000u64;
    let mut header = String::from("{");
    for i in 0..n {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""model.layers.{i}.self_attn.q_proj.weight.padding.padding.padding":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}"#,
            i * 4,
            i * 4 + 4
        ));
    }
    header.push('}');
    assert!(header.len() > 6 << 20, "{}", header.len());
    write(&path, &safetensors_bytes(&header, (n * 4) as usize));
    // A budget too small to read it: refused as too slow, not read on.
    let options = Options {
        limits: Limits {
            time_budget: Duration::from_millis(1),
            ..Limits::default()
        },
        ..Options::default()
    };
    let error = estimate(&Root::host(), &path, &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("took longer than the 1ms budget"), "{error}");
    // A cap below the header: refused naming the cap.
    let options = Options {
        limits: Limits {
            max_header_bytes: 1 << 20,
            ..Limits::default()
        },
        ..Options::default()
    };
    let error = estimate(&Root::host(), &path, &options)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("expected at most the 1048576 bytes header cap"),
        "{error}"
    );
    // Generous bounds: read (a debug build on a slow machine needs a few seconds).
    let options = Options {
        limits: Limits {
            time_budget: Duration::from_secs(120),
            ..Limits::default()
        },
        ..Options::default()
    };
    let e = estimate(&Root::host(), &path, &options).unwrap();
    assert_eq!((e.tensors, e.weights_bytes), (n, n * 4));
}

#[test]
fn offsets_to_u64_max_are_refused_not_16_eib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let header = format!(
        r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        u64::MAX,
        u64::MAX
    );
    write(&path, &safetensors_bytes(&header, 16));
    let error = estimate(&Root::host(), &path, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("tensor \"w\" data_offsets is [0, 18446744073709551615], expected to end inside the file's 16 data bytes"),
        "{error}"
    );
    // Under the file size but above the sane cap: a sparse 2 GiB file with a cap of 1 GiB.
    let big = dir.path().join("big.safetensors");
    let header = r#"{"w":{"dtype":"U8","shape":[2147483648],"data_offsets":[0,2147483648]}}"#;
    write(&big, &safetensors_bytes(header, 0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(8 + header.len() as u64 + (2 << 30))
        .unwrap();
    let options = Options {
        limits: Limits {
            max_total_bytes: 1 << 30,
            ..Limits::default()
        },
        ..Options::default()
    };
    let error = estimate(&Root::host(), &big, &options)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("estimate is 2147483648 bytes (weights 2147483648, KV cache 0), expected at most 1073741824 bytes"),
        "{error}"
    );
}

#[test]
fn a_link_out_of_the_model_directory_is_not_followed_nor_quoted() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    // Its first bytes would pass for a header length, then a brace: still never quoted.
    std::fs::write(&secret, b"SECRET-TOKEN-1234{...}").unwrap();
    let models = tempfile::tempdir().unwrap();
    let link = models.path().join("m.safetensors");
    symlink(&secret, &link).unwrap();
    let uri = format!("file://{}", link.display());
    let error = estimate_uri(&uri, &Root::host(), &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("refused (links are followed only inside"),
        "{error}"
    );
    assert!(
        !error.contains("SECRET") && !error.contains("1234"),
        "{error}"
    );
    // A relative link that climbs out is refused the same way.
    let climb = models.path().join("n.safetensors");
    let relative = std::path::Path::new("..")
        .join(outside.path().strip_prefix("/").unwrap())
        .join("secret");
    let deep: std::path::PathBuf = std::iter::repeat_n("..", 32).collect();
    symlink(deep.join(&relative), &climb).unwrap();
    let error = estimate(&Root::host(), &climb, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("refused"), "{error}");
    // A file that is not safetensors at all: its bytes are not quoted either.
    let plain = models.path().join("plain.safetensors");
    std::fs::write(&plain, b"SECRET-TOKEN-1234 and more").unwrap();
    let error = estimate(&Root::host(), &plain, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("is not a safetensors file"), "{error}");
    assert!(
        !error.contains("SECRET") && !error.contains("1234") && !error.contains("5495"),
        "{error}"
    );
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("m.gguf");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let error = estimate(&Root::host(), &fifo, &Options::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("is a FIFO, expected a regular file"),
        "{error}"
    );
}
