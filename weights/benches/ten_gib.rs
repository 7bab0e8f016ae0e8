//! `cargo bench -p modelpool-weights --bench ten_gib [-- GIB ROUNDS]`: time to estimate a big
//! model from its header alone, on sparse files (a 10 GiB GGUF with a 128k-token vocabulary, a
//! 10 GiB safetensors file, and 10 GiB in four shards with an index), each estimate divided by
//! the baseline measured in the same run: reading the same header bytes raw into memory (the
//! least any header reader does). One JSON line per format.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant},
};

use modelpool_weights::{Options, Root, estimate};
use serde_json::{Value, json};

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A llama-8B-like GGUF header (32 blocks, Q4_K / Q6_K / F32 tensors, a 128 256-token vocabulary
/// with scores, types and merges), its tensors scaled so their data is `bytes` long; returns
/// (header bytes, data bytes).
fn write_gguf(path: &Path, bytes: u64) -> std::io::Result<(u64, u64)> {
    let vocab = 128_256u64;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    let layers = 32u64;
    let per_layer = 9u64;
    let tensors = layers * per_layer + 3;
    out.extend(tensors.to_le_bytes());
    let kvs: u64 = 10;
    out.extend(kvs.to_le_bytes());
    let u32_kv = |out: &mut Vec<u8>, key: &str, v: u32| {
        gguf_string(out, key);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    };
    gguf_string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    gguf_string(&mut out, "llama");
    u32_kv(&mut out, "llama.context_length", 131_072);
    u32_kv(&mut out, "llama.block_count", layers as u32);
    u32_kv(&mut out, "llama.embedding_length", 4096);
    u32_kv(&mut out, "llama.attention.head_count", 32);
    u32_kv(&mut out, "llama.attention.head_count_kv", 8);
    u32_kv(&mut out, "general.alignment", 32);
    // tokenizer.ggml.tokens (strings), .scores (f32), .merges (strings)
    gguf_string(&mut out, "tokenizer.ggml.tokens");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(vocab.to_le_bytes());
    for i in 0..vocab {
        gguf_string(&mut out, &format!("Ġtoken{i}"));
    }
    gguf_string(&mut out, "tokenizer.ggml.scores");
    out.extend(9u32.to_le_bytes());
    out.extend(6u32.to_le_bytes());
    out.extend(vocab.to_le_bytes());
    out.resize(out.len() + 4 * vocab as usize, 0);
    gguf_string(&mut out, "tokenizer.ggml.merges");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    let merges = 280_147u64;
    out.extend(merges.to_le_bytes());
    for i in 0..merges {
        gguf_string(&mut out, &format!("Ġt oken{i}"));
    }
    // Tensors: F32 [4096 x rows] with rows chosen so the data adds up to `bytes`.
    let row = 4096u64 * 4;
    let rows_total = bytes / row;
    let rows_each = rows_total / tensors;
    let mut offset = 0u64;
    for t in 0..tensors {
        let rows = if t == tensors - 1 {
            rows_total - rows_each * (tensors - 1)
        } else {
            rows_each
        };
        gguf_string(
            &mut out,
            &format!("blk.{}.tensor_{}.weight", t / per_layer, t % per_layer),
        );
        out.extend(2u32.to_le_bytes());
        out.extend(4096u64.to_le_bytes());
        out.extend(rows.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += rows * row;
    }
    let header = out.len().div_ceil(32) as u64 * 32;
    let mut file = std::fs::File::create(path)?;
    file.write_all(&out)?;
    file.set_len(header + offset)?;
    Ok((header, offset))
}

/// Name of tensor `t` in the generated files.
fn tensor_name(t: u64) -> String {
    format!("model.layers.{}.mlp.proj_{}.weight", t / 9, t % 9)
}

/// A safetensors file of `tensors` BF16 tensors (named from `first` on) adding up to `bytes`
/// of data (sparse).
fn write_safetensors(
    path: &Path,
    bytes: u64,
    tensors: u64,
    first: u64,
) -> std::io::Result<(u64, u64)> {
    let each = bytes / tensors / 2 * 2;
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for t in 0..tensors {
        header.push_str(&format!(
            ",\"{}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            tensor_name(first + t),
            each / 2,
            t * each,
            (t + 1) * each
        ));
    }
    header.push('}');
    let mut file = std::fs::File::create(path)?;
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header.as_bytes())?;
    file.set_len(8 + header.len() as u64 + tensors * each)?;
    Ok((8 + header.len() as u64, tensors * each))
}

/// The baseline: read `n` bytes of `path` into memory.
fn read_raw(path: &Path, n: u64) -> std::io::Result<usize> {
    let mut buf = Vec::with_capacity(n as usize);
    std::fs::File::open(path)?.take(n).read_to_end(&mut buf)?;
    Ok(buf.len())
}

fn time<T>(
    rounds: usize,
    mut f: impl FnMut() -> Result<T, Box<dyn std::error::Error>>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    f()?; // warm the page cache
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(f()?);
    }
    Ok(started.elapsed() / rounds as u32)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let gib = args.first().map_or(Ok(10), |a| a.parse())?;
    let rounds = args.get(1).map_or(Ok(20), |a| a.parse())?;
    for row in run(gib, rounds)? {
        println!("{row}");
    }
    Ok(())
}

fn round(value: f64) -> Value {
    json!((value * 1000.0).round() / 1000.0)
}

/// Runs the scenario: one row per format.
fn run(gib: u64, rounds: usize) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let bytes = gib << 30;
    let mut rows = Vec::new();
    let options = Options::default();
    let gguf = dir.path().join("model.gguf");
    let st = dir.path().join("model.safetensors");
    let shards = dir.path().join("sharded");
    std::fs::create_dir(&shards)?;
    let mut index = serde_json::Map::new();
    let mut shard_header = 0;
    for s in 0..4u64 {
        let name = format!("model-{:05}-of-00004.safetensors", s + 1);
        let (h, _) = write_safetensors(&shards.join(&name), bytes / 4, 73, s * 73)?;
        shard_header += h;
        for t in 0..73 {
            index.insert(tensor_name(s * 73 + t), name.clone().into());
        }
    }
    let index_json = serde_json::json!({"metadata": {}, "weight_map": index}).to_string();
    std::fs::write(shards.join("model.safetensors.index.json"), &index_json)?;
    let cases = [
        ("gguf", gguf.clone(), write_gguf(&gguf, bytes)?.0),
        (
            "safetensors",
            st.clone(),
            write_safetensors(&st, bytes, 291, 0)?.0,
        ),
        (
            "sharded_safetensors",
            shards.clone(),
            shard_header + index_json.len() as u64,
        ),
    ];
    for (format, path, header_bytes) in cases {
        let estimate_once = || -> Result<u64, Box<dyn std::error::Error>> {
            Ok(estimate(&Root::host(), &path, &options)?.weights_bytes)
        };
        let weights = estimate_once()?;
        let estimate_time = time(rounds, estimate_once)?;
        let raw = time(rounds, || -> Result<usize, Box<dyn std::error::Error>> {
            if path.is_dir() {
                let mut n = 0;
                for entry in std::fs::read_dir(&path)? {
                    let p = entry?.path();
                    let len = std::fs::metadata(&p)?.len().min(header_bytes);
                    let mut first = [0u8; 8];
                    std::fs::File::open(&p)?.read_exact(&mut first)?;
                    let h = if p.extension().is_some_and(|e| e == "json") {
                        len
                    } else {
                        8 + u64::from_le_bytes(first)
                    };
                    n += read_raw(&p, h)?;
                }
                Ok(n)
            } else {
                Ok(read_raw(&path, header_bytes)?)
            }
        })?;
        rows.push(json!({
            "bench": "weights",
            "format": format,
            "file_gib": round(bytes as f64 / (1u64 << 30) as f64),
            "header_mib": round(header_bytes as f64 / (1 << 20) as f64),
            "estimated_gib": round(weights as f64 / (1u64 << 30) as f64),
            "estimate_ms": round(estimate_time.as_secs_f64() * 1e3),
            "raw_read_ms": round(raw.as_secs_f64() * 1e3),
            "estimate_over_raw": round(estimate_time.as_secs_f64() / raw.as_secs_f64()),
        }));
    }
    Ok(rows)
}
