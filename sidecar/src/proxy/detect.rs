//! Which model a request names, from its protocol:
//!
//! ```text
//!  OpenAI   POST /v1/chat/completions, /v1/completions, /v1/embeddings   body "model"
//!  Ollama   POST /api/generate, /api/chat, /api/embed, /api/embeddings   body "model"
//!  KServe   /v2/models/{name}[/versions/{v}]/...  (infer, ready, metadata, generate)  path
//! ```
//!
//! Bodies are read only as far as the model name: [`ModelScan`] is an incremental scanner of
//! a JSON object's top-level keys, fed chunk by chunk as they arrive, that stops at the value
//! of `"model"` (wherever it is among the keys: the OpenAI Python client sends `messages`
//! first).

/// The protocol a request speaks: the shape its errors are given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI-compatible (`/v1/...`): errors are `{"error": {"message", "type", "code", ...}}`.
    OpenAi,
    /// Ollama (`/api/...`): errors are `{"error": "message", ...}`.
    Ollama,
    /// KServe v2 / Open Inference Protocol (`/v2/...`): errors are `{"error": "message", ...}`.
    KServe,
}

impl Protocol {
    /// For logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Ollama => "ollama",
            Self::KServe => "kserve",
        }
    }

    /// The protocol of a path that names no model (errors of pass-through requests).
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/api/") {
            Self::Ollama
        } else if path.starts_with("/v2/") {
            Self::KServe
        } else {
            Self::OpenAi
        }
    }
}

/// Where a request's model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// In the JSON body's top-level `"model"`.
    Body(Protocol),
    /// In the path (KServe v2).
    Path(Protocol, String),
}

/// The model a request names, or `None` for a request that names none (passed through).
pub fn route(path: &str) -> Option<Named> {
    match path {
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => {
            Some(Named::Body(Protocol::OpenAi))
        }
        "/api/generate" | "/api/chat" | "/api/embed" | "/api/embeddings" => {
            Some(Named::Body(Protocol::Ollama))
        }
        _ => {
            let rest = path.strip_prefix("/v2/models/")?;
            let name = rest.split('/').next().filter(|n| !n.is_empty())?;
            Some(Named::Path(Protocol::KServe, percent_decode(name)))
        }
    }
}

/// `%XX` escapes of a path segment (model names are plain, but a client may escape a `:`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// What a scan found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Not yet: feed more.
    More,
    /// The model's name.
    Found(String),
    /// The object ended without a `"model"` string.
    NoModel,
    /// Not a JSON object with a string `"model"`: why.
    Invalid(String),
}

/// An incremental scanner for the top-level `"model"` string of a JSON object.
#[derive(Debug, Default)]
pub struct ModelScan {
    started: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// At depth 1: the next string is a key.
    expect_key: bool,
    /// At depth 1: the last key read was `"model"`.
    model_key: bool,
    /// The raw bytes (quotes included) of a depth-1 string being read: a key, or the model.
    capture: Option<Vec<u8>>,
    capturing_key: bool,
    /// The model was found: the scan goes on only to catch a second `"model"` key.
    found: bool,
    done: Option<Scan>,
}

impl ModelScan {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the body. Once the model is found the scan goes on over the
    /// rest of the body (the chunk it was found in, and what later calls feed): a second
    /// top-level `"model"` key turns it `Invalid`, since a server that reads the last one
    /// (Go's encoding/json, which also matches keys without regard to case) would serve
    /// another model than the one leased. Later calls answer `More` while all is well.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let mut found = None;
        let mut i = 0;
        while i < chunk.len() {
            // Inside a string the scan only waits for its closing quote: jump to it, past
            // escaped characters, instead of stepping through a prompt byte by byte (most of
            // a chat body is its messages' text).
            if self.in_string && self.capture.is_none() {
                // A backslash that ended the last chunk escapes this one's first byte.
                let mut from = i + usize::from(std::mem::take(&mut self.escape));
                let quote = loop {
                    let Some(at) = chunk.get(from..).and_then(next_quote_or_backslash) else {
                        break None;
                    };
                    let at = from + at;
                    if chunk[at] == b'"' {
                        break Some(at);
                    }
                    // A backslash: it and the character it escapes (maybe in the next chunk).
                    self.escape = at + 1 >= chunk.len();
                    from = at + 2;
                };
                match quote {
                    Some(at) => i = at,
                    None => break, // the string goes on past this chunk
                }
            }
            let b = chunk[i];
            i += 1;
            match self.step(b) {
                None => {}
                Some(Scan::Found(model)) => {
                    self.found = true;
                    found = Some(Scan::Found(model));
                }
                Some(Scan::NoModel) if self.found => {}
                Some(outcome) => {
                    self.done = Some(outcome.clone());
                    return outcome;
                }
            }
        }
        found.unwrap_or(Scan::More)
    }

    /// The body ended.
    pub fn finish(&mut self) -> Scan {
        if let Some(done) = &self.done {
            return done.clone();
        }
        if self.found {
            return Scan::More;
        }
        if self.started {
            Scan::Invalid("the JSON body ends before its object closes".to_owned())
        } else {
            Scan::NoModel
        }
    }

    fn step(&mut self, b: u8) -> Option<Scan> {
        if self.in_string {
            if let Some(capture) = self.capture.as_mut() {
                capture.push(b);
            }
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if let Some(raw) = self.capture.take() {
                    let text: Result<String, _> = serde_json::from_slice(&raw);
                    let Ok(text) = text else {
                        return Some(Scan::Invalid(
                            "a top-level key or the model is not a valid JSON string".to_owned(),
                        ));
                    };
                    if self.capturing_key {
                        self.model_key = text.eq_ignore_ascii_case("model");
                        if self.model_key && self.found && self.depth == 1 {
                            return Some(Scan::Invalid(
                                "the body names \"model\" twice (keys compared without regard to case)"
                                    .to_owned(),
                            ));
                        }
                    } else {
                        return Some(Scan::Found(text));
                    }
                }
            }
            return None;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'{' | b'[' => {
                if !self.started {
                    if b == b'[' {
                        return Some(not_object());
                    }
                    self.started = true;
                    self.depth = 1;
                    self.expect_key = true;
                    return None;
                }
                if self.depth == 1 && !self.expect_key && self.model_key {
                    return Some(not_string());
                }
                self.depth += 1;
            }
            b'}' | b']' => {
                if !self.started {
                    return Some(not_object());
                }
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    return Some(Scan::NoModel);
                }
            }
            b'"' => {
                if !self.started {
                    return Some(not_object());
                }
                self.in_string = true;
                if self.depth == 1 {
                    if self.expect_key {
                        self.capture = Some(vec![b'"']);
                        self.capturing_key = true;
                    } else if self.model_key {
                        self.capture = Some(vec![b'"']);
                        self.capturing_key = false;
                    }
                }
            }
            b':' if self.depth == 1 => self.expect_key = false,
            b',' if self.depth == 1 => {
                self.expect_key = true;
                self.model_key = false;
            }
            _ => {
                if !self.started {
                    return Some(not_object());
                }
                if self.depth == 1 && !self.expect_key && self.model_key {
                    return Some(not_string());
                }
            }
        }
        None
    }
}

/// Where the next `"` or `\` is: eight bytes a step (memchr's portable word-at-a-time
/// search). Not memchr's SIMD search: chat text has an escape (`\n`, `\"`) every few words,
/// and each SIMD call cost about 100 instructions to set up (callgrind), more than it saved.
fn next_quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    memchr::arch::all::memchr::Two::new(b'"', b'\\').find(bytes)
}

fn not_object() -> Scan {
    Scan::Invalid("the body is not a JSON object".to_owned())
}

fn not_string() -> Scan {
    Scan::Invalid("field \"model\" must be a string".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(body: &str) -> Scan {
        let mut scan = ModelScan::new();
        match scan.feed(body.as_bytes()) {
            Scan::More => scan.finish(),
            other => other,
        }
    }

    #[test]
    fn routes_name_the_protocol() {
        assert_eq!(
            route("/v1/chat/completions"),
            Some(Named::Body(Protocol::OpenAi))
        );
        assert_eq!(route("/api/embed"), Some(Named::Body(Protocol::Ollama)));
        assert_eq!(
            route("/v2/models/iris/infer"),
            Some(Named::Path(Protocol::KServe, "iris".to_owned()))
        );
        assert_eq!(
            route("/v2/models/llama3%3A8b/versions/1/infer"),
            Some(Named::Path(Protocol::KServe, "llama3:8b".to_owned()))
        );
        assert_eq!(route("/v2/models/"), None);
        assert_eq!(route("/v2/health/ready"), None);
        assert_eq!(route("/api/version"), None);
        assert_eq!(route("/v1/models"), None);
    }

    #[test]
    fn finds_the_model_wherever_it_is() {
        assert_eq!(
            scan_whole(r#"{"model": "tiny", "prompt": "hi"}"#),
            Scan::Found("tiny".to_owned())
        );
        assert_eq!(
            scan_whole(
                r#"{"messages": [{"role": "user", "content": "say \"model\": \"x\""}], "stream": true, "model":"a\u0062c"}"#
            ),
            Scan::Found("abc".to_owned())
        );
        // A nested "model" is not the request's.
        assert_eq!(
            scan_whole(r#"{"options": {"model": "x"}, "prompt": "p"}"#),
            Scan::NoModel
        );
        // A value that only looks like the key.
        assert_eq!(scan_whole(r#"{"prompt": "model", "x": 1}"#), Scan::NoModel);
    }

    #[test]
    fn stops_at_the_model_across_chunks() {
        let body =
            br#"{"messages": [{"content": "long \\ text"}], "model": "tiny", "rest": [1, 2, 3"#;
        for split in 1..body.len() {
            let mut scan = ModelScan::new();
            let first = scan.feed(&body[..split]);
            let outcome = if first == Scan::More {
                scan.feed(&body[split..])
            } else {
                first
            };
            assert_eq!(outcome, Scan::Found("tiny".to_owned()), "split at {split}");
        }
    }

    /// Strings are jumped through to their closing quote, not stepped through: escapes,
    /// quotes and backslashes at every chunk boundary (and fed byte by byte) give the same outcome.
    #[test]
    fn skipping_strings_keeps_the_outcome_at_every_chunk_boundary() {
        // Raw strings: each backslash below is one byte of the body.
        let found = |m: &str| Scan::Found(m.to_owned());
        let twice = Scan::Invalid(
            "the body names \"model\" twice (keys compared without regard to case)".to_owned(),
        );
        let open = Scan::Invalid("the JSON body ends before its object closes".to_owned());
        // Runs of plain text longer than one eight-byte step of the search.
        let long = format!(
            r#"{{"prompt": "{}\" {}\\", "x": "{}", "model": "m"}}"#,
            "a".repeat(80),
            "b".repeat(70),
            "c".repeat(33)
        );
        let cases: [(&[u8], Scan); 9] = [
            (long.as_bytes(), found("m")),
            (
                br#"{"messages": [{"content": "a \" quote \\ and \\\" more"}], "model": "m", "p": "x"}"#,
                found("m"),
            ),
            (br#"{"prompt": "ends in a backslash \\", "model": "m"}"#, found("m")),
            (br#"{"prompt": "\"model\": \"not me\"", "model": "real"}"#, found("real")),
            (
                br#"{"prompt": "long \" text", "Model": "a", "x": "\\", "MODEL": "b"}"#,
                twice,
            ),
            (br#"{"prompt": "no model here \" at all"}"#, Scan::NoModel),
            (br#"{"prompt": "line\nbreak\t\n", "model": "m"}"#, found("m")),
            (br#"{"prompt": "\u0022model\u0022\n", "model": "m"}"#, found("m")),
            (br#"{"prompt": "unterminated \""#, open),
        ];
        for (body, expected) in cases {
            let text = String::from_utf8_lossy(body);
            let mut by_byte = ModelScan::new();
            let mut answers: Vec<Scan> = body.iter().map(|b| by_byte.feed(&[*b])).collect();
            answers.push(by_byte.finish());
            assert_eq!(outcome(&answers), expected, "{text} byte by byte");
            for split in 0..=body.len() {
                let mut scan = ModelScan::new();
                let mut answers = vec![scan.feed(&body[..split]), scan.feed(&body[split..])];
                answers.push(scan.finish());
                assert_eq!(outcome(&answers), expected, "{text} split at {split}");
            }
        }
    }

    /// What a sequence of answers says in the end: a refusal if any (a second key refuses the
    /// body, whether or not the first was answered), else the model found, else no model.
    fn outcome(answers: &[Scan]) -> Scan {
        let first = |pick: fn(&Scan) -> bool| answers.iter().find(|a| pick(a)).cloned();
        first(|a| matches!(a, Scan::Invalid(_)))
            .or_else(|| first(|a| matches!(a, Scan::Found(_))))
            .or_else(|| first(|a| matches!(a, Scan::NoModel)))
            .unwrap_or(Scan::More)
    }

    #[test]
    fn a_second_model_key_is_refused_in_any_chunk() {
        let body =
            br#"{"model": "small", "messages": [{"model": "nested is fine"}], "MODEL": "big"}"#;
        for split in 1..body.len() {
            let mut scan = ModelScan::new();
            let mut outcomes = vec![scan.feed(&body[..split]), scan.feed(&body[split..])];
            outcomes.push(scan.finish());
            assert!(
                outcomes
                    .iter()
                    .any(|o| matches!(o, Scan::Invalid(why) if why.contains("twice"))),
                "split at {split}: {outcomes:?}"
            );
        }
        // One model key, then the rest of the body: all well to the end.
        let mut scan = ModelScan::new();
        assert_eq!(
            scan.feed(br#"{"Model": "a", "#),
            Scan::Found("a".to_owned())
        );
        assert_eq!(scan.feed(br#""prompt": "model"}"#), Scan::More);
        assert_eq!(scan.finish(), Scan::More);
    }

    #[test]
    fn refuses_what_is_not_an_object_with_a_string_model() {
        assert!(matches!(scan_whole("[1, 2]"), Scan::Invalid(_)));
        assert!(matches!(scan_whole("model=tiny"), Scan::Invalid(_)));
        assert_eq!(
            scan_whole(r#"{"model": 7}"#),
            Scan::Invalid("field \"model\" must be a string".to_owned())
        );
        assert!(matches!(
            scan_whole(r#"{"model": {"a": 1}}"#),
            Scan::Invalid(_)
        ));
        assert!(matches!(
            scan_whole(r#"{"prompt": "unfinished"#),
            Scan::Invalid(_)
        ));
        assert_eq!(scan_whole(""), Scan::NoModel);
        assert_eq!(scan_whole("{}"), Scan::NoModel);
    }
}
