//! GGUF (versions 2 and 3): the header only, streamed. Metadata values are kept only when they
//! are small (numbers, short strings, short integer arrays); the tokenizer's long arrays are
//! skipped without being held.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64, the metadata
//! (key string, value type u32, value), the tensor infos (name string, n_dims u32, dims u64 x
//! n_dims, ggml type u32, offset u64 from the data section), then the data section at the next
//! multiple of `general.alignment` (32 by default).

use std::{collections::BTreeMap, io::Read, path::Path, time::Instant};

use crate::{
    KvCache, Limits, Options, WeightsError,
    bounded::{Bounded, open_regular},
    error::shown,
};

/// The magic, as the first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Nesting of arrays in metadata values (GGUF allows arrays of arrays; none go deeper).
const MAX_ARRAY_DEPTH: u32 = 3;
/// Integer arrays up to this length are kept (per-layer head counts).
const KEEP_ARRAY: u64 = 4096;
/// Strings up to this length are kept.
const KEEP_STRING: u64 = 256;

/// A ggml tensor type: (name, elements per block, bytes per block). From ggml's
/// `type_traits` (the same table as gguf-py's `GGML_QUANT_SIZES`); ids 4, 5 and 31..33, 36..38
/// were removed from ggml and are refused.
pub fn ggml_type(id: u32) -> Option<(&'static str, u64, u64)> {
    const QK_K: u64 = 256;
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 2 + 16),
        3 => ("Q4_1", 32, 2 + 2 + 16),
        6 => ("Q5_0", 32, 2 + 4 + 16),
        7 => ("Q5_1", 32, 2 + 2 + 4 + 16),
        8 => ("Q8_0", 32, 2 + 32),
        9 => ("Q8_1", 32, 4 + 4 + 32),
        10 => ("Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
        11 => ("Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
        12 => ("Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
        13 => ("Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
        14 => ("Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
        15 => ("Q8_K", QK_K, 4 + QK_K + QK_K / 8),
        16 => ("IQ2_XXS", QK_K, 2 + QK_K / 4),
        17 => ("IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
        18 => ("IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
        19 => ("IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
        20 => ("IQ4_NL", 32, 2 + 16),
        21 => ("IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
        22 => ("IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
        23 => ("IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", QK_K, 2 + 4 * 13),
        35 => ("TQ2_0", QK_K, 2 + 64),
        39 => ("MXFP4", 32, 1 + 16),
        40 => ("NVFP4", 64, 4 + 32),
        41 => ("Q1_0", 128, 2 + 16),
        _ => return None,
    })
}

/// A metadata value worth keeping.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any integer type (signed ones that fit).
    Int(i128),
    /// f32 / f64.
    Float(f64),
    /// bool.
    Bool(bool),
    /// A short string.
    Str(String),
    /// A short array of integers.
    Ints(Vec<i128>),
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
}

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// ggml type id.
    pub ggml_type: u32,
    /// Dimensions (ne0 first).
    pub dims: Vec<u64>,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes its data takes.
    pub bytes: u64,
}

/// What the header says.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The kept metadata.
    pub metadata: BTreeMap<String, Value>,
    /// How many tensors.
    pub tensor_count: u64,
    /// The sum of the tensors' bytes.
    pub tensor_bytes: u64,
    /// Where the data section starts.
    pub data_start: u64,
    /// The largest `offset + bytes` of any tensor, from the data section.
    pub data_end: u64,
}

impl Header {
    fn int(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The model's own context length (`{arch}.context_length`).
    pub fn context_length(&self) -> Option<u64> {
        self.int(&format!("{}.context_length", self.architecture()?))
    }

    /// The KV cache for `context` tokens (the model's own context length when `None`), with
    /// `element_bytes` per cached element (2: llama.cpp's default f16 cache). `None` when the
    /// metadata lacks what it takes (an architecture without attention, for one).
    pub fn kv_cache(
        &self,
        path: &Path,
        context: Option<u64>,
        element_bytes: u64,
    ) -> Result<Option<KvCache>, WeightsError> {
        let Some(arch) = self.architecture() else {
            return Ok(None);
        };
        let key = |k: &str| format!("{arch}.{k}");
        let Some(context) = context.or_else(|| self.context_length()) else {
            return Ok(None);
        };
        let (Some(blocks), Some(heads)) = (
            self.int(&key("block_count")),
            self.per_layer(&key("attention.head_count")),
        ) else {
            return Ok(None);
        };
        let embedding = self.int(&key("embedding_length"));
        let heads_kv = self
            .per_layer(&key("attention.head_count_kv"))
            .unwrap_or_else(|| heads.clone());
        let layer = |list: &[u64], i: u64| -> u64 {
            if list.len() == 1 {
                list[0]
            } else {
                list.get(i as usize).copied().unwrap_or(0)
            }
        };
        let max_heads = heads.iter().copied().max().unwrap_or(0);
        if max_heads == 0 {
            return Ok(None);
        }
        let head_dim = |k: &str| -> Result<Option<u64>, WeightsError> {
            match self.int(&key(k)) {
                Some(v) => Ok(Some(v)),
                None => match embedding {
                    Some(e) if e % max_heads == 0 => Ok(Some(e / max_heads)),
                    Some(e) => Err(WeightsError::invalid(
                        path,
                        format!("metadata {}", shown(&key("embedding_length"))),
                        e,
                        format!("a multiple of the head count {max_heads}"),
                    )),
                    None => Ok(None),
                },
            }
        };
        let (Some(key_len), Some(value_len)) = (
            head_dim("attention.key_length")?,
            head_dim("attention.value_length")?,
        ) else {
            return Ok(None);
        };
        let overflow = || {
            WeightsError::invalid(
                path,
                "KV cache size",
                "beyond 2^64 bytes",
                "a size that fits (check context_length, block_count and head counts)",
            )
        };
        let mut per_token: u64 = 0;
        for i in 0..blocks {
            let kv_heads = layer(&heads_kv, i);
            let layer_elems = kv_heads
                .checked_mul(key_len.checked_add(value_len).ok_or_else(overflow)?)
                .ok_or_else(overflow)?;
            per_token = per_token.checked_add(layer_elems).ok_or_else(overflow)?;
        }
        let bytes = per_token
            .checked_mul(context)
            .and_then(|b| b.checked_mul(element_bytes))
            .ok_or_else(overflow)?;
        Ok(Some(KvCache { context, bytes }))
    }

    fn per_layer(&self, key: &str) -> Option<Vec<u64>> {
        match self.metadata.get(key)? {
            Value::Int(v) => Some(vec![u64::try_from(*v).ok()?]),
            Value::Ints(list) => list.iter().map(|v| u64::try_from(*v).ok()).collect(),
            _ => None,
        }
    }
}

struct Reader<'a, R> {
    r: Bounded<R>,
    path: &'a Path,
    /// Tensor and metadata counts are checked against what the cap leaves room for.
    cap: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes<const N: usize>(
        &mut self,
        field: &dyn Fn() -> String,
    ) -> Result<[u8; N], WeightsError> {
        let mut buf = [0u8; N];
        if let Err(error) = self.r.read_exact(&mut buf) {
            return Err(self.r.error(error, &field()));
        }
        Ok(buf)
    }
    fn u8(&mut self, field: &dyn Fn() -> String) -> Result<u8, WeightsError> {
        Ok(self.bytes::<1>(field)?[0])
    }
    fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.bytes(field)?))
    }
    fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64, WeightsError> {
        Ok(u64::from_le_bytes(self.bytes(field)?))
    }

    fn time(&mut self, field: &dyn Fn() -> String) -> Result<(), WeightsError> {
        self.r
            .check_time()
            .map_err(|stop| self.r.stop_error(stop, &field()))
    }

    /// A string's length, checked against the bytes left under the cap.
    fn string_len(&mut self, field: &dyn Fn() -> String) -> Result<u64, WeightsError> {
        let len = self.u64(field)?;
        if len > self.cap.saturating_sub(self.r.read) {
            return Err(WeightsError::invalid(
                self.path,
                format!("{} length", field()),
                len,
                format!(
                    "at most the {} bytes left under the header cap",
                    self.cap.saturating_sub(self.r.read)
                ),
            ));
        }
        Ok(len)
    }

    /// A string: kept (lossy UTF-8) when at most `keep` bytes long, else skipped.
    fn string(
        &mut self,
        keep: u64,
        field: &dyn Fn() -> String,
    ) -> Result<Option<String>, WeightsError> {
        let len = self.string_len(field)?;
        if len > keep {
            self.r.skip(len, field)?;
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        if let Err(error) = self.r.read_exact(&mut buf) {
            return Err(self.r.error(error, &field()));
        }
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    /// A metadata value of type `kind`; `Some` when worth keeping.
    fn value(
        &mut self,
        kind: u32,
        depth: u32,
        field: &dyn Fn() -> String,
    ) -> Result<Option<Value>, WeightsError> {
        let v = match kind {
            0 => Value::Int(self.u8(field)?.into()),
            1 => Value::Int((self.u8(field)? as i8).into()),
            2 => Value::Int(u16::from_le_bytes(self.bytes(field)?).into()),
            3 => Value::Int(i16::from_le_bytes(self.bytes(field)?).into()),
            4 => Value::Int(self.u32(field)?.into()),
            5 => Value::Int(i32::from_le_bytes(self.bytes(field)?).into()),
            6 => Value::Float(f32::from_le_bytes(self.bytes(field)?).into()),
            7 => {
                let b = self.u8(field)?;
                if b > 1 {
                    return Err(WeightsError::invalid(
                        self.path,
                        field(),
                        b,
                        "a bool (0 or 1)",
                    ));
                }
                Value::Bool(b == 1)
            }
            8 => return Ok(self.string(KEEP_STRING, field)?.map(Value::Str)),
            9 => return self.array(depth, field),
            10 => Value::Int(self.u64(field)?.into()),
            11 => Value::Int(i64::from_le_bytes(self.bytes(field)?).into()),
            12 => Value::Float(f64::from_le_bytes(self.bytes(field)?)),
            other => {
                return Err(WeightsError::invalid(
                    self.path,
                    format!("{} value type", field()),
                    other,
                    "a GGUF value type 0..=12",
                ));
            }
        };
        Ok(Some(v))
    }

    fn array(
        &mut self,
        depth: u32,
        field: &dyn Fn() -> String,
    ) -> Result<Option<Value>, WeightsError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(WeightsError::invalid(
                self.path,
                format!("{} array nesting", field()),
                depth + 1,
                format!("at most {MAX_ARRAY_DEPTH} levels"),
            ));
        }
        let elem = self.u32(field)?;
        let count = self.u64(field)?;
        // Every element takes at least one byte (a string eight): more elements than bytes left
        // under the cap cannot be right.
        let min = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8..=12 => 8,
            other => {
                return Err(WeightsError::invalid(
                    self.path,
                    format!("{} array element type", field()),
                    other,
                    "a GGUF value type 0..=12",
                ));
            }
        };
        let left = self.cap.saturating_sub(self.r.read);
        if count.saturating_mul(min) > left {
            return Err(WeightsError::invalid(
                self.path,
                format!("{} array length", field()),
                count,
                format!(
                    "at most {} elements in the {left} bytes left under the header cap",
                    left / min
                ),
            ));
        }
        let fixed = match elem {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        let integer = matches!(elem, 0..=5 | 10 | 11);
        if let Some(size) = fixed
            && !(integer && count <= KEEP_ARRAY)
        {
            self.r.skip(count * size, field)?;
            return Ok(None);
        }
        if elem == 8 {
            // Strings in arrays (the vocabulary) are never kept: lengths checked, bytes skipped.
            for i in 0..count {
                if i % 4096 == 0 {
                    self.time(field)?;
                }
                let len = self.string_len(field)?;
                self.r.skip(len, field)?;
            }
            return Ok(None);
        }
        let mut kept = Vec::new();
        for i in 0..count {
            if i % 4096 == 0 {
                self.time(field)?;
            }
            match self.value(elem, depth + 1, field)? {
                Some(Value::Int(v)) if integer => kept.push(v),
                _ => {}
            }
        }
        Ok(integer.then_some(Value::Ints(kept)))
    }
}

/// Reads the header of the GGUF file at `host` (shown as `path` in errors); also returns the
/// file's length.
pub fn read_header(
    host: &Path,
    path: &Path,
    limits: &Limits,
) -> Result<(Header, u64), WeightsError> {
    let started = Instant::now();
    let (file, file_len) = open_regular(host, path)?;
    let header = parse(
        Bounded::file(file, path, limits, started),
        file_len,
        path,
        limits,
    )?;
    Ok((header, file_len))
}

/// Parses a GGUF header from bytes (the whole file, or its start with `file_len` the file's
/// length): what the fuzz target drives.
pub fn parse_bytes(bytes: &[u8], file_len: u64, limits: &Limits) -> Result<Header, WeightsError> {
    let path = Path::new("<bytes>");
    parse(
        Bounded::new(bytes, path, limits, Instant::now()),
        file_len,
        path,
        limits,
    )
}

fn parse<R: Read>(
    bounded: Bounded<R>,
    file_len: u64,
    path: &Path,
    limits: &Limits,
) -> Result<Header, WeightsError> {
    let mut r = Reader {
        r: bounded,
        path,
        cap: limits.max_header_bytes,
    };
    let magic: [u8; 4] = match r.bytes(&|| "magic".into()) {
        Ok(magic) => magic,
        Err(error) if r.r.stopped.is_some() => return Err(error),
        Err(_) => {
            return Err(WeightsError::NotFormat {
                path: path.to_owned(),
                format: "GGUF",
                reason: "shorter than its magic".into(),
            });
        }
    };
    if &magic != MAGIC {
        return Err(WeightsError::NotFormat {
            path: path.to_owned(),
            format: "GGUF",
            reason: "it does not start with the GGUF magic".into(),
        });
    }
    let version = r.u32(&|| "version".into())?;
    if !(2..=3).contains(&version) {
        return Err(WeightsError::invalid(path, "version", version, "2 or 3"));
    }
    let tensor_count = r.u64(&|| "tensor count".into())?;
    let kv_count = r.u64(&|| "metadata count".into())?;
    // The smallest tensor info is 8 + 4 + 8 + 4 + 8 bytes; the smallest metadata entry 8 + 4 + 1.
    let left = limits.max_header_bytes.saturating_sub(r.r.read);
    if tensor_count > left / 32 {
        return Err(WeightsError::invalid(
            path,
            "tensor count",
            tensor_count,
            format!(
                "at most {} (what the {} bytes header cap can describe)",
                left / 32,
                limits.max_header_bytes
            ),
        ));
    }
    if kv_count > left / 13 {
        return Err(WeightsError::invalid(
            path,
            "metadata count",
            kv_count,
            format!(
                "at most {} (what the {} bytes header cap can describe)",
                left / 13,
                limits.max_header_bytes
            ),
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        if i % 256 == 0 {
            r.time(&|| format!("metadata entry {i}"))?;
        }
        let key = r
            .string(KEEP_STRING, &|| format!("metadata entry {i} key"))?
            .unwrap_or_default();
        let field = || format!("metadata {}", shown(&key));
        let kind = r.u32(&field)?;
        if let Some(value) = r.value(kind, 0, &field)?
            && !key.is_empty()
        {
            metadata.insert(key.clone(), value);
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::Int(a)) if *a > 0 && *a <= 1 << 20 && (*a as u64).is_power_of_two() => {
            *a as u64
        }
        Some(other) => {
            return Err(WeightsError::invalid(
                path,
                "metadata \"general.alignment\"",
                format!("{other:?}"),
                "a power of two up to 1 MiB",
            ));
        }
    };
    let mut tensors = Vec::with_capacity(tensor_count.min(1 << 16) as usize);
    for i in 0..tensor_count {
        if i % 256 == 0 {
            r.time(&|| format!("tensor info {i}"))?;
        }
        let name = r
            .string(KEEP_STRING, &|| format!("tensor info {i} name"))?
            .unwrap_or_else(|| format!("#{i}"));
        let field = |what: &str| format!("tensor {} {what}", shown(&name));
        let n_dims = r.u32(&|| field("n_dims"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(WeightsError::invalid(
                path,
                field("n_dims"),
                n_dims,
                format!("1..={MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&|| field("dims"))?);
        }
        let type_id = r.u32(&|| field("type"))?;
        let offset = r.u64(&|| field("offset"))?;
        let Some((type_name, block, block_bytes)) = ggml_type(type_id) else {
            return Err(WeightsError::invalid(
                path,
                field("type"),
                type_id,
                "a ggml type id known to ggml (0..=41, less the removed ones)",
            ));
        };
        if dims[0] % block != 0 {
            return Err(WeightsError::invalid(
                path,
                field("dims[0]"),
                dims[0],
                format!("a multiple of {block} (the {type_name} block size)"),
            ));
        }
        let too_big = || {
            WeightsError::invalid(
                path,
                field("dims"),
                format!("{dims:?}"),
                "a shape whose bytes fit in 64 bits",
            )
        };
        let mut bytes = (dims[0] / block)
            .checked_mul(block_bytes)
            .ok_or_else(too_big)?;
        for d in &dims[1..] {
            bytes = bytes.checked_mul(*d).ok_or_else(too_big)?;
        }
        if offset % alignment != 0 {
            return Err(WeightsError::invalid(
                path,
                field("offset"),
                offset,
                format!("a multiple of the alignment {alignment}"),
            ));
        }
        tensors.push((
            name,
            TensorInfo {
                ggml_type: type_id,
                dims,
                offset,
                bytes,
            },
        ));
    }
    let data_start = r.r.read.div_ceil(alignment) * alignment;
    // Every tensor lies inside the file, and no two overlap.
    tensors.sort_by_key(|(_, t)| t.offset);
    let mut end = 0u64;
    let mut total = 0u64;
    for (name, t) in &tensors {
        let field = |what: &str| format!("tensor {} {what}", shown(name));
        if t.offset < end {
            return Err(WeightsError::invalid(
                path,
                field("offset"),
                t.offset,
                format!("at least {end} (it overlaps the tensor before it)"),
            ));
        }
        end = t.offset.checked_add(t.bytes).ok_or_else(|| {
            WeightsError::invalid(
                path,
                field("offset"),
                t.offset,
                "an offset + size that fits in 64 bits",
            )
        })?;
        if data_start.saturating_add(end) > file_len {
            return Err(WeightsError::invalid(
                path,
                field("offset + size"),
                format!(
                    "{} + {} (ends at byte {})",
                    t.offset,
                    t.bytes,
                    data_start.saturating_add(end)
                ),
                format!("to end inside the file ({file_len} bytes)"),
            ));
        }
        total = total.saturating_add(t.bytes);
    }
    Ok(Header {
        version,
        metadata,
        tensor_count,
        tensor_bytes: total,
        data_start,
        data_end: end,
    })
}

/// The estimate for one GGUF file.
pub(crate) fn estimate(
    host: &Path,
    path: &Path,
    options: &Options,
) -> Result<(Header, Option<KvCache>), WeightsError> {
    let (header, _) = read_header(host, path, &options.limits)?;
    let context = options.context.or_else(|| {
        let own = header.context_length()?;
        Some(options.max_default_context.map_or(own, |cap| own.min(cap)))
    });
    let kv = header.kv_cache(path, context, options.kv_element_bytes)?;
    Ok((header, kv))
}
