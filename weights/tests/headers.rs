//! The readers on files written by hand: right sizes, and every malformed field refused with
//! its name, its value and what was expected.
#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use modelpool_weights::{Format, Limits, Options, Root, WeightsError, estimate, estimate_uri};

fn est(path: &Path) -> Result<modelpool_weights::Estimate, WeightsError> {
    estimate(&Root::host(), path, &Options::default())
}

fn err(path: &Path) -> String {
    est(path).unwrap_err().to_string()
}

fn tensor(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Tensor {
    Tensor {
        name: name.into(),
        dims: dims.to_vec(),
        ggml_type,
        offset,
    }
}

#[test]
fn gguf_weights_and_kv_cache_of_a_llama_like_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write(&path, &llama(4, 256, 8, 2, 4096));
    let e = est(&path).unwrap();
    assert_eq!(e.format, Format::Gguf);
    assert_eq!(e.tensors, 4);
    assert_eq!(e.weights_bytes, 4 * 256 * 256 * 2);
    // K and V, per layer: 2 kv heads x 32 dims (256 / 8 heads), f16, 4096 tokens.
    let kv = e.kv_cache.unwrap();
    assert_eq!(kv.context, 4096);
    assert_eq!(kv.bytes, 4 * 2 * (2 * 32) * 2 * 4096);
    assert_eq!(e.total_bytes(), e.weights_bytes + kv.bytes);
    // A configured context replaces the model's own.
    let options = Options {
        context: Some(512),
        ..Options::default()
    };
    let e = estimate(&Root::host(), &path, &options).unwrap();
    assert_eq!(e.kv_cache.unwrap().bytes, 4 * 2 * 64 * 2 * 512);
    // Without one, a cap on the model's own (Ollama's default num_ctx).
    let options = Options {
        max_default_context: Some(1024),
        ..Options::default()
    };
    let e = estimate(&Root::host(), &path, &options).unwrap();
    assert_eq!(e.kv_cache.unwrap().context, 1024);
    let options = Options {
        max_default_context: Some(1 << 20),
        ..Options::default()
    };
    let e = estimate(&Root::host(), &path, &options).unwrap();
    assert_eq!(e.kv_cache.unwrap().context, 4096);
}

#[test]
fn gguf_quantized_blocks_and_explicit_head_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    let kvs = [
        ("general.architecture", Kv::Str("qwen3".into())),
        ("qwen3.context_length", Kv::U64(1000)),
        ("qwen3.block_count", Kv::U32(2)),
        ("qwen3.embedding_length", Kv::U32(100)),
        ("qwen3.attention.head_count", Kv::U32(4)),
        // Per layer (as some models give it), and explicit key/value lengths.
        ("qwen3.attention.head_count_kv", Kv::ArrU32(vec![1, 3])),
        ("qwen3.attention.key_length", Kv::U32(128)),
        ("qwen3.attention.value_length", Kv::U32(64)),
    ];
    // Q4_K: 256 elements in 144 bytes; Q8_0: 32 in 34; Q6_K: 256 in 210.
    let tensors = [
        tensor("a", &[512, 3], 12, 0),
        tensor("b", &[64, 2, 2], 8, 896),
        tensor("c", &[256], 14, 1184),
    ];
    write(&path, &gguf(&kvs, &tensors, 1184 + 210));
    let e = est(&path).unwrap();
    assert_eq!(e.weights_bytes, 2 * 144 * 3 + 2 * 34 * 4 + 210);
    assert_eq!(e.kv_cache.unwrap().bytes, (128 + 64) * (1 + 3) * 2 * 1000);
}

#[test]
fn gguf_without_attention_metadata_has_weights_but_no_kv_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write(&path, &gguf(&[], &[tensor("w", &[8], 0, 0)], 32));
    let e = est(&path).unwrap();
    assert_eq!((e.weights_bytes, e.kv_cache), (32, None));
}

fn malformed_gguf(bytes: Vec<u8>, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    write(&path, &bytes);
    let error = err(&path);
    for part in expected {
        assert!(error.contains(part), "{error:?} lacks {part:?}");
    }
}

#[test]
fn malformed_gguf_is_refused_with_the_field_named() {
    malformed_gguf(
        b"GGML not at all".to_vec(),
        &["is not a GGUF file", "magic"],
    );
    let mut v1 = llama(1, 32, 1, 1, 8);
    v1[4] = 1;
    malformed_gguf(v1, &["version is 1, expected 2 or 3"]);
    malformed_gguf(
        gguf(&[], &[tensor("w", &[8], 77, 0)], 32),
        &["tensor \"w\" type is 77", "ggml type"],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[33], 8, 0)], 64),
        &[
            "tensor \"w\" dims[0] is 33",
            "multiple of 32 (the Q8_0 block size)",
        ],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[1, 2, 3, 4, 5], 0, 0)], 64),
        &["tensor \"w\" n_dims is 5, expected 1..=4"],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[1 << 40, 1 << 40], 0, 0)], 64),
        &["tensor \"w\" dims", "fit in 64 bits"],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[8], 0, 32)], 32),
        &[
            "tensor \"w\" offset + size is 32 + 32",
            "to end inside the file",
        ],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[8], 0, u64::MAX - 31)], 32),
        &["tensor \"w\" offset", "fits in 64 bits"],
    );
    malformed_gguf(
        gguf(&[], &[tensor("w", &[8], 0, 3)], 64),
        &["tensor \"w\" offset is 3, expected a multiple of the alignment 32"],
    );
    malformed_gguf(
        gguf(
            &[],
            &[tensor("a", &[16], 0, 0), tensor("b", &[8], 0, 32)],
            128,
        ),
        &["tensor \"b\" offset is 32", "overlaps"],
    );
    malformed_gguf(
        gguf(&[("k", Kv::Raw(13, vec![]))], &[], 0),
        &["metadata \"k\" value type is 13"],
    );
    malformed_gguf(
        gguf(
            &[("k", Kv::Raw(8, u64::MAX.to_le_bytes().to_vec()))],
            &[],
            0,
        ),
        &[
            "metadata \"k\" length is 18446744073709551615",
            "header cap",
        ],
    );
    let mut array = 4u32.to_le_bytes().to_vec();
    array.extend(u64::MAX.to_le_bytes());
    malformed_gguf(
        gguf(&[("k", Kv::Raw(9, array))], &[], 0),
        &["metadata \"k\" array length is 18446744073709551615"],
    );
    let mut counts = llama(1, 32, 1, 1, 8);
    counts[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    malformed_gguf(counts, &["tensor count is 18446744073709551615"]);
    let mut short = llama(2, 32, 1, 1, 8);
    short.truncate(100);
    malformed_gguf(
        short,
        &["cut short at byte", "the file ends inside its header"],
    );
    malformed_gguf(
        gguf(&[("general.alignment", Kv::U32(3))], &[], 0),
        &["metadata \"general.alignment\"", "a power of two"],
    );
}

#[test]
fn gguf_type_table_matches_ggml() {
    // Spot checks against ggml's type_traits (the Python tests compare the whole table with
    // gguf-py's GGML_QUANT_SIZES).
    use modelpool_weights::gguf::ggml_type;
    assert_eq!(ggml_type(0), Some(("F32", 1, 4)));
    assert_eq!(ggml_type(2), Some(("Q4_0", 32, 18)));
    assert_eq!(ggml_type(12), Some(("Q4_K", 256, 144)));
    assert_eq!(ggml_type(14), Some(("Q6_K", 256, 210)));
    assert_eq!(ggml_type(30), Some(("BF16", 1, 2)));
    assert_eq!(ggml_type(39), Some(("MXFP4", 32, 17)));
    for removed in [4, 5, 31, 32, 33, 36, 37, 38, 42] {
        assert_eq!(ggml_type(removed), None, "{removed}");
    }
}

const ST: &str = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1024,256],"data_offsets":[0,1048576]},"b":{"dtype":"BF16","shape":[256],"data_offsets":[1048576,1049088]}}"#;

#[test]
fn safetensors_file_uri() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &safetensors_bytes(ST, 1_049_088));
    let e = estimate_uri(
        &format!("file://{}", path.display()),
        &Root::host(),
        &Options::default(),
    )
    .unwrap();
    assert_eq!(
        (e.format, e.files, e.tensors, e.weights_bytes),
        (Format::Safetensors, 1, 2, 1_049_088)
    );
    let error = estimate_uri(
        "s3://bucket/m.safetensors",
        &Root::host(),
        &Options::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("only file:///absolute/path URIs"), "{error}");
    let error = estimate_uri(
        "file:///nonexistent/m.safetensors",
        &Root::host(),
        &Options::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("failed to read /nonexistent"), "{error}");
}

fn malformed_st(header: &str, data: usize, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    write(&path, &safetensors_bytes(header, data));
    let error = err(&path);
    for part in expected {
        assert!(error.contains(part), "{error:?} lacks {part:?}");
    }
}

#[test]
fn malformed_safetensors_is_refused_with_the_field_named() {
    malformed_st(
        "not json",
        0,
        &["is not a safetensors file", "does not start with '{'"],
    );
    malformed_st(
        "{\"w\": {\"dtype\"",
        0,
        &["header is not valid JSON", "Eof"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F17","shape":[2],"data_offsets":[0,4]}}"#,
        4,
        &["tensor \"w\" dtype is \"F17\"", "a safetensors dtype"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#,
        8,
        &["tensor \"w\" data_offsets is [0, 8] (8 bytes), expected 4 bytes (shape [2] of F16)"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
        2,
        &[
            "tensor \"w\" data_offsets is [0, 4]",
            "inside the file's 2 data bytes",
        ],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[8,4]}}"#,
        8,
        &["begin <= end"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"v":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"#,
        8,
        &["data_offsets is [2, 6]", "overlap"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[2]}}"#,
        8,
        &["tensor \"w\" data_offsets is missing, expected two integers"],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":"big","data_offsets":[0,4]}}"#,
        8,
        &["tensor \"w\" shape is the string \"big\""],
    );
    malformed_st(
        r#"{"w":{"dtype":"F16","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
        8,
        &["a shape whose size fits in 64 bits"],
    );
}

#[test]
fn sharded_safetensors_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let a = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let b = r#"{"b":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"c":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;
    write(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &safetensors_bytes(a, 16),
    );
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &safetensors_bytes(b, 11),
    );
    // Without an index: every safetensors file of the directory.
    let e = est(dir.path()).unwrap();
    assert_eq!(
        (e.format, e.files, e.tensors, e.weights_bytes),
        (Format::SafetensorsDirectory, 2, 3, 27)
    );
    let index = r#"{"metadata":{"total_size":27},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#;
    write(
        &dir.path().join("model.safetensors.index.json"),
        index.as_bytes(),
    );
    // A stray file is not counted once there is an index.
    write(
        &dir.path().join("other.safetensors"),
        &safetensors_bytes(a, 16),
    );
    let e = est(dir.path()).unwrap();
    assert_eq!(
        (e.format, e.files, e.tensors, e.weights_bytes),
        (Format::ShardedSafetensors, 2, 3, 27)
    );
    // The index names a tensor its shard does not hold.
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","z":"model-00001-of-00002.safetensors"}}"#;
    write(
        &dir.path().join("model.safetensors.index.json"),
        index.as_bytes(),
    );
    let error = err(dir.path());
    assert!(error.contains("weight_map[\"z\"] is \"model-00001-of-00002.safetensors\", expected a shard that holds that tensor"), "{error}");
    // A shard outside the directory.
    let index = r#"{"weight_map":{"a":"../elsewhere.safetensors"}}"#;
    write(
        &dir.path().join("model.safetensors.index.json"),
        index.as_bytes(),
    );
    let error = err(dir.path());
    assert!(error.contains("refused"), "{error}");
    // A shard missing.
    let index = r#"{"weight_map":{"a":"gone.safetensors"}}"#;
    write(
        &dir.path().join("model.safetensors.index.json"),
        index.as_bytes(),
    );
    let error = err(dir.path());
    assert!(error.contains("gone.safetensors"), "{error}");
    // Not an index.
    write(&dir.path().join("model.safetensors.index.json"), b"[1,2]");
    let error = err(dir.path());
    assert!(
        error.contains("index is not a safetensors index"),
        "{error}"
    );
}

#[test]
fn gguf_directories_one_model_or_one_split_model() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("m.gguf"), &llama(2, 64, 2, 2, 128));
    let e = est(dir.path()).unwrap();
    assert_eq!((e.format, e.weights_bytes), (Format::Gguf, 2 * 64 * 64 * 2));
    write(&dir.path().join("n.gguf"), &llama(2, 64, 2, 2, 128));
    assert!(err(dir.path()).contains("GGUF files is 2, expected one model per directory"));
    let split = tempfile::tempdir().unwrap();
    write(
        &split.path().join("m-00001-of-00002.gguf"),
        &llama(2, 64, 2, 2, 128),
    );
    write(
        &split.path().join("m-00002-of-00002.gguf"),
        &gguf(&[], &[tensor("x", &[8], 0, 0)], 32),
    );
    let e = est(split.path()).unwrap();
    assert_eq!(
        (e.files, e.tensors, e.weights_bytes),
        (2, 3, 2 * 64 * 64 * 2 + 32)
    );
    assert_eq!(e.kv_cache.unwrap().context, 128);
    let empty = tempfile::tempdir().unwrap();
    write(&empty.path().join("pytorch_model.bin"), b"pickle");
    assert!(err(empty.path()).contains("no .safetensors"));
    assert!(
        err(&empty.path().join("pytorch_model.bin")).contains("not a .gguf or .safetensors file")
    );
}

#[test]
fn absurd_estimates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    // A context so long the KV cache passes the cap.
    write(&path, &llama(2, 64, 2, 2, u32::MAX));
    let options = Options {
        limits: Limits {
            max_total_bytes: 1 << 30,
            ..Limits::default()
        },
        ..Options::default()
    };
    let error = estimate(&Root::host(), &path, &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("estimate is"), "{error}");
    assert!(
        error.contains("expected at most 1073741824 bytes"),
        "{error}"
    );
}

#[test]
fn time_budget_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let tokens: Vec<String> = (0..400_000).map(|i| format!("token-{i}")).collect();
    write(
        &path,
        &gguf(&[("tokenizer.ggml.tokens", Kv::ArrStr(tokens))], &[], 0),
    );
    let options = Options {
        limits: Limits {
            time_budget: Duration::ZERO,
            ..Limits::default()
        },
        ..Options::default()
    };
    let error = estimate(&Root::host(), &path, &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("took longer than the 0ns budget"), "{error}");
    // With a budget a slow machine's debug build meets, the same file is read.
    let options = Options {
        limits: Limits {
            time_budget: Duration::from_secs(120),
            ..Limits::default()
        },
        ..Options::default()
    };
    assert_eq!(estimate(&Root::host(), &path, &options).unwrap().tensors, 0);
}
