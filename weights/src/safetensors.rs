//! safetensors: 8 bytes of little-endian header length, then a JSON object mapping each tensor
//! name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets from the end of the
//! header), and `__metadata__` (strings). The header is parsed as a stream, one entry at a time,
//! so memory stays small whatever its size.

use std::{
    collections::BTreeSet,
    fmt,
    io::Read,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::{
    Limits, WeightsError,
    bounded::{Bounded, Stop, open_regular},
    error::shown,
};

/// Headers up to this size are read into memory and parsed there; larger ones are streamed.
const BUFFERED_HEADER: u64 = 4 << 20;

/// Bytes per element of a safetensors dtype; `None` for an unknown one.
pub fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "C64" => 64,
        _ => return None,
    })
}

/// What one file's header says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    /// Tensors in the file.
    pub tensors: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their names, when asked for (the sharded reader checks the index against them).
    pub names: Option<BTreeSet<String>>,
}

struct Tensors<'a> {
    path: &'a Path,
    data_len: u64,
    keep_names: bool,
    error: &'a mut Option<WeightsError>,
    overlap: &'a mut Option<u32>,
    deadline: Instant,
    budget: std::time::Duration,
}

fn fail<E: serde::de::Error>(slot: &mut Option<WeightsError>, error: WeightsError) -> E {
    *slot = Some(error);
    E::custom("refused")
}

impl<'de> Visitor<'de> for Tensors<'_> {
    type Value = FileSummary;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileSummary, A::Error> {
        let mut ranges: Vec<(u64, u64, u32)> = Vec::new();
        let mut names = self.keep_names.then(BTreeSet::new);
        let mut count: u32 = 0;
        while let Some(name) = map.next_key::<String>()? {
            if count % 256 == 255 && Instant::now() > self.deadline {
                return Err(fail(
                    self.error,
                    WeightsError::TooSlow {
                        path: self.path.to_owned(),
                        budget: self.budget,
                    },
                ));
            }
            if name == "__metadata__" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let entry: serde_json::Value = map.next_value()?;
            let field = |what: &str| format!("tensor {} {what}", shown(&name));
            let invalid = |what: &str, value: String, expected: &str| {
                WeightsError::invalid(self.path, field(what), value, expected)
            };
            let Some(entry) = entry.as_object() else {
                return Err(fail(
                    self.error,
                    invalid(
                        "entry",
                        kind(&entry),
                        "an object {dtype, shape, data_offsets}",
                    ),
                ));
            };
            let dtype = match entry.get("dtype") {
                Some(serde_json::Value::String(d)) => d.as_str(),
                other => {
                    return Err(fail(
                        self.error,
                        invalid(
                            "dtype",
                            other.map_or("missing".into(), kind),
                            "a dtype string such as \"F16\"",
                        ),
                    ));
                }
            };
            let Some(bits) = dtype_bits(dtype) else {
                return Err(fail(
                    self.error,
                    invalid(
                        "dtype",
                        shown(dtype),
                        "a safetensors dtype (BOOL, U8..U64, I8..I64, F4, F6_*, F8_*, F16, BF16, F32, F64, C64)",
                    ),
                ));
            };
            let shape: Option<Vec<u64>> = match entry.get("shape") {
                Some(serde_json::Value::Array(dims)) if dims.len() <= 64 => {
                    dims.iter().map(serde_json::Value::as_u64).collect()
                }
                _ => None,
            };
            let Some(shape) = shape else {
                return Err(fail(
                    self.error,
                    invalid(
                        "shape",
                        entry.get("shape").map_or("missing".into(), kind),
                        "a list of at most 64 non-negative integers",
                    ),
                ));
            };
            let offsets: Option<(u64, u64)> = match entry.get("data_offsets") {
                Some(serde_json::Value::Array(o)) if o.len() == 2 => {
                    o[0].as_u64().zip(o[1].as_u64())
                }
                _ => None,
            };
            let Some((begin, end)) = offsets else {
                return Err(fail(
                    self.error,
                    invalid(
                        "data_offsets",
                        entry.get("data_offsets").map_or("missing".into(), kind),
                        "two integers [begin, end]",
                    ),
                ));
            };
            if begin > end {
                return Err(fail(
                    self.error,
                    invalid("data_offsets", format!("[{begin}, {end}]"), "begin <= end"),
                ));
            }
            if end > self.data_len {
                return Err(fail(
                    self.error,
                    invalid(
                        "data_offsets",
                        format!("[{begin}, {end}]"),
                        &format!("to end inside the file's {} data bytes", self.data_len),
                    ),
                ));
            }
            let elements = shape.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
            let expected = elements
                .and_then(|e| e.checked_mul(bits))
                .map(|b| b.div_ceil(8));
            if expected != Some(end - begin) {
                return Err(fail(
                    self.error,
                    invalid(
                        "data_offsets",
                        format!("[{begin}, {end}] ({} bytes)", end - begin),
                        &match expected {
                            Some(b) => format!("{b} bytes (shape {shape:?} of {dtype})"),
                            None => format!("a shape whose size fits in 64 bits (shape {shape:?})"),
                        },
                    ),
                ));
            }
            ranges.push((begin, end, count));
            count = count.saturating_add(1);
            if let Some(names) = names.as_mut()
                && !names.insert(name.clone())
            {
                return Err(fail(
                    self.error,
                    invalid("name", "given twice".into(), "each tensor once"),
                ));
            }
        }
        // The tensors do not overlap (zero-sized ones take no room).
        ranges.sort_unstable();
        let mut last_end = 0u64;
        let mut bytes = 0u64;
        for (begin, end, index) in &ranges {
            if begin == end {
                continue;
            }
            if *begin < last_end {
                // Names are not kept (memory stays small): the caller finds this one's.
                *self.overlap = Some(*index);
                return Err(fail(
                    self.error,
                    WeightsError::invalid(
                        self.path,
                        "data_offsets",
                        format!("[{begin}, {end}]"),
                        format!("not to overlap another tensor (which ends at {last_end})"),
                    ),
                ));
            }
            last_end = *end;
            bytes += end - begin;
        }
        Ok(FileSummary {
            tensors: ranges.len() as u64,
            bytes,
            names,
        })
    }
}

fn kind(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(_) => "a bool".into(),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(s) => format!("the string {}", shown(s)),
        serde_json::Value::Array(a) => format!("a list of {} items", a.len()),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

impl<'de> DeserializeSeed<'de> for Tensors<'_> {
    type Value = FileSummary;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<FileSummary, D::Error> {
        d.deserialize_map(self)
    }
}

/// Reads the header of the safetensors file at `host` (shown as `path`).
pub fn read_file(
    host: &Path,
    path: &Path,
    limits: &Limits,
    keep_names: bool,
) -> Result<FileSummary, WeightsError> {
    let started = Instant::now();
    let (file, file_len) = open_regular(host, path)?;
    let reopen = || -> Option<Box<dyn Read>> {
        Some(Box::new(std::io::BufReader::new(
            open_regular(host, host).ok()?.0,
        )))
    };
    parse(
        Bounded::file(file, path, limits, started),
        file_len,
        path,
        limits,
        keep_names,
        &reopen,
    )
}

/// Parses a safetensors header from bytes (the whole file, or its start with `file_len` the
/// file's length): what the fuzz target drives.
pub fn parse_bytes(
    bytes: &[u8],
    file_len: u64,
    limits: &Limits,
) -> Result<FileSummary, WeightsError> {
    let path = Path::new("<bytes>");
    let reopen = || -> Option<Box<dyn Read + '_>> { Some(Box::new(bytes)) };
    parse(
        Bounded::new(bytes, path, limits, Instant::now()),
        file_len,
        path,
        limits,
        true,
        &reopen,
    )
}

type Reopen<'a> = dyn Fn() -> Option<Box<dyn Read + 'a>> + 'a;

fn parse<R: Read>(
    mut r: Bounded<R>,
    file_len: u64,
    path: &Path,
    limits: &Limits,
    keep_names: bool,
    reopen: &Reopen<'_>,
) -> Result<FileSummary, WeightsError> {
    let started = Instant::now();
    let not_format = |reason: &str| WeightsError::NotFormat {
        path: path.to_owned(),
        format: "safetensors",
        reason: reason.to_owned(),
    };
    let mut length = [0u8; 8];
    match r.exact(&mut length, "header length") {
        Err(error) if r.stopped.is_some() => return Err(error),
        Err(_) => return Err(not_format("shorter than its 8-byte header length")),
        Ok(()) => {}
    }
    // Nothing of the file is quoted until it looks like safetensors: its header starts with '{'.
    let mut first = [0u8; 1];
    match r.exact(&mut first, "header") {
        Err(error) if r.stopped.is_some() => return Err(error),
        Err(_) => return Err(not_format("nothing after the header length")),
        Ok(()) => {}
    }
    if first[0] != b'{' {
        return Err(not_format("its header does not start with '{'"));
    }
    let length = u64::from_le_bytes(length);
    if length < 2 {
        return Err(WeightsError::invalid(
            path,
            "header length",
            length,
            "at least 2 (a JSON object)",
        ));
    }
    if length > limits.max_header_bytes {
        return Err(WeightsError::invalid(
            path,
            "header length",
            length,
            format!("at most the {} bytes header cap", limits.max_header_bytes),
        ));
    }
    if length.saturating_add(8) > file_len {
        return Err(WeightsError::invalid(
            path,
            "header length",
            length,
            format!("at most the file's {} bytes less 8", file_len),
        ));
    }
    let data_len = file_len - 8 - length;
    let mut error = None;
    let mut overlap = None;
    let tensors = |error, overlap| Tensors {
        path,
        data_len,
        keep_names,
        error,
        overlap,
        deadline: started + limits.time_budget,
        budget: limits.time_budget,
    };
    let result = if length <= BUFFERED_HEADER {
        // Headers of real models are KiBs: read at once and parsed from memory (fast).
        let mut header = vec![0u8; length as usize];
        header[0] = b'{';
        r.exact(&mut header[1..], "header")?;
        let mut de = serde_json::Deserializer::from_slice(&header);
        tensors(&mut error, &mut overlap)
            .deserialize(&mut de)
            .and_then(|summary| de.end().map(|()| summary))
    } else {
        // Larger ones are streamed: memory stays small whatever the size.
        let header = (&first[..]).chain((&mut r).take(length - 1));
        let mut de = serde_json::Deserializer::from_reader(header);
        tensors(&mut error, &mut overlap)
            .deserialize(&mut de)
            .and_then(|summary| de.end().map(|()| summary))
    };
    if let (Some(index), Some(WeightsError::Invalid { field, .. })) = (overlap, error.as_mut())
        && let Some(name) = reopen().and_then(|file| name_at(file, length, index))
    {
        *field = format!("tensor {} data_offsets", shown(&name));
    }
    match result {
        Ok(summary) => Ok(summary),
        Err(json) => Err(error.unwrap_or_else(|| match r.stopped {
            Some(Stop::Time) => r.stop_error(Stop::Time, "header"),
            Some(Stop::Cap) => r.stop_error(Stop::Cap, "header"),
            // serde_json's own message may quote the file: give only where and what kind.
            None => WeightsError::invalid(
                path,
                "header",
                format!(
                    "not valid JSON ({:?} error at line {} column {})",
                    json.classify(),
                    json.line(),
                    json.column()
                ),
                "a JSON object of tensors",
            ),
        })),
    }
}

/// The index of a sharded checkpoint: which shard holds each tensor.
#[derive(Debug, serde::Deserialize)]
struct Index {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// Reads `model.safetensors.index.json` (at `host`, shown as `path`): the shards' file names, and
/// for each the tensor names it must hold.
pub(crate) fn read_index(
    host: &Path,
    path: &Path,
    limits: &Limits,
) -> Result<Vec<(PathBuf, BTreeSet<String>)>, WeightsError> {
    let started = Instant::now();
    let (file, _) = open_regular(host, path)?;
    let mut r = Bounded::file(file, path, limits, started);
    let index: Result<Index, _> = serde_json::from_reader(&mut r);
    let index = index.map_err(|json| match r.stopped {
        Some(stop) => r.stop_error(stop, "index"),
        None => WeightsError::invalid(
            path,
            "index",
            format!(
                "not a safetensors index ({:?} error at line {} column {})",
                json.classify(),
                json.line(),
                json.column()
            ),
            "a JSON object with a \"weight_map\" of tensor name to shard file",
        ),
    })?;
    let mut shards: std::collections::BTreeMap<&str, BTreeSet<String>> = Default::default();
    for (tensor, shard) in &index.weight_map {
        shards.entry(shard).or_default().insert(tensor.clone());
    }
    if shards.is_empty() {
        return Err(WeightsError::invalid(
            path,
            "weight_map",
            "empty",
            "at least one tensor",
        ));
    }
    Ok(shards
        .into_iter()
        .map(|(shard, names)| (PathBuf::from(shard), names))
        .collect())
}

/// The name of the `index`-th tensor of a header already read once (for an error message).
fn name_at(file: Box<dyn Read + '_>, length: u64, index: u32) -> Option<String> {
    struct Nth(u32);
    impl<'de> Visitor<'de> for Nth {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut i = 0;
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if name == "__metadata__" {
                    continue;
                }
                if i == self.0 {
                    return Ok(Some(name));
                }
                i += 1;
            }
            Ok(None)
        }
    }
    let mut file = file;
    std::io::copy(&mut (&mut file).take(8), &mut std::io::sink()).ok()?;
    let mut de = serde_json::Deserializer::from_reader(file.take(length));
    serde::Deserializer::deserialize_map(&mut de, Nth(index)).ok()?
}
