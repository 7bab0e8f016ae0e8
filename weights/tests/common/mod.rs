//! Writers for the tests: GGUF and safetensors bytes built by hand, so that every field can be
//! set to a hostile value. (The tests under `tests/py` use the real `gguf` and `safetensors`
//! packages for the files a loader reads.)
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

/// A GGUF metadata value.
pub enum Kv {
    U32(u32),
    U64(u64),
    Str(String),
    ArrU32(Vec<u32>),
    ArrStr(Vec<String>),
    /// Raw: value type and bytes.
    Raw(u32, Vec<u8>),
}

pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

pub fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF v3 file: header, then `data` bytes of tensor data at alignment 32.
pub fn gguf(kvs: &[(&str, Kv)], tensors: &[Tensor], data: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        string(&mut out, key);
        match value {
            Kv::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Kv::U64(v) => {
                out.extend(10u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Kv::ArrU32(list) => {
                out.extend(9u32.to_le_bytes());
                out.extend(4u32.to_le_bytes());
                out.extend((list.len() as u64).to_le_bytes());
                for v in list {
                    out.extend(v.to_le_bytes());
                }
            }
            Kv::ArrStr(list) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((list.len() as u64).to_le_bytes());
                for s in list {
                    string(&mut out, s);
                }
            }
            Kv::Raw(kind, bytes) => {
                out.extend(kind.to_le_bytes());
                out.extend(bytes);
            }
        }
    }
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(t.offset.to_le_bytes());
    }
    let start = out.len().div_ceil(32) * 32;
    out.resize(start + data as usize, 0);
    out
}

/// A llama-like GGUF: `layers` blocks, F16 weights of `hidden` x `hidden`.
pub fn llama(layers: u32, hidden: u64, heads: u32, heads_kv: u32, context: u32) -> Vec<u8> {
    let kvs = vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("llama.context_length", Kv::U32(context)),
        ("llama.block_count", Kv::U32(layers)),
        ("llama.embedding_length", Kv::U32(hidden as u32)),
        ("llama.attention.head_count", Kv::U32(heads)),
        ("llama.attention.head_count_kv", Kv::U32(heads_kv)),
        (
            "tokenizer.ggml.tokens",
            Kv::ArrStr((0..300).map(|i| format!("tok{i}")).collect()),
        ),
    ];
    let mut tensors = Vec::new();
    let mut offset = 0;
    for l in 0..layers {
        tensors.push(Tensor {
            name: format!("blk.{l}.attn_q.weight"),
            dims: vec![hidden, hidden],
            ggml_type: 1,
            offset,
        });
        offset += (hidden * hidden * 2).div_ceil(32) * 32;
    }
    gguf(&kvs, &tensors, offset)
}

/// A safetensors file from a header (JSON text) and `data` bytes.
pub fn safetensors_bytes(header: &str, data: usize) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data, 7);
    bytes
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}
