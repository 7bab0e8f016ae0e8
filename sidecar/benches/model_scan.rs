//! Time the proxy's scan of a request body for its `"model"` (`proxy::detect::ModelScan`):
//! every byte of every proxied JSON body goes through it (the scan goes on past the model to
//! refuse a second `"model"` key). Baseline in the same run: copying the same bytes once, which
//! forwarding a body costs anyway. BENCHMARKS.md, proxy.
//!
//! `cargo bench -p modelpool-sidecar --bench model_scan`

use std::{hint::black_box, time::Instant};

use modelpool_sidecar::proxy::detect::{ModelScan, Scan};

/// 64 KiB of prompt: chat text with an escape every few words, or plain words.
fn body(escapes: bool) -> Vec<u8> {
    let words: &[&str] = if escapes {
        &[
            "the ",
            "model ",
            "said ",
            "\\\"yes\\\" ",
            "and\\n",
            "tokens ",
        ]
    } else {
        &["the ", "model ", "said ", "yes ", "and ", "tokens "]
    };
    let mut prompt = String::new();
    for word in words.iter().cycle() {
        if prompt.len() >= 64 * 1024 {
            break;
        }
        prompt.push_str(word);
    }
    format!(r#"{{"messages": [{{"role": "user", "content": "{prompt}"}}], "model": "m"}}"#)
        .into_bytes()
}

/// Seconds per call of `f`, the best of five rounds of `n` calls.
fn time(n: u32, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_secs_f64() / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    for (name, escapes) in [
        ("chat text, 3 escapes per 35 bytes", true),
        ("plain text", false),
    ] {
        let body = body(escapes);
        let scan = time(2_000, || {
            let mut scan = ModelScan::new();
            let mut found = Scan::More;
            for chunk in body.chunks(16 * 1024) {
                if let Scan::Found(model) = scan.feed(chunk) {
                    found = Scan::Found(model);
                }
            }
            assert_eq!(black_box(scan.finish()), Scan::More);
            assert_eq!(found, Scan::Found("m".to_owned()));
        });
        let copy = time(2_000, || {
            let mut out = Vec::with_capacity(body.len());
            for chunk in body.chunks(16 * 1024) {
                out.extend_from_slice(black_box(chunk));
            }
            black_box(out);
        });
        let bytes = body.len() as f64;
        println!(
            "{name}: {} bytes, scan {:.1} µs ({:.2} ns/byte), copy {:.1} µs ({:.2} ns/byte), scan/copy {:.1}",
            body.len(),
            scan * 1e6,
            scan * 1e9 / bytes,
            copy * 1e6,
            copy * 1e9 / bytes,
            scan / copy
        );
    }
}
